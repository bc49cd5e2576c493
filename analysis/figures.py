"""Figures of the analysis tools: matplotlib on the Agg backend (no display needed), written as PNG."""


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend selected (imported on first use: it is slow to import)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path, dpi=110):
    """Lay out, write and close ``fig``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
