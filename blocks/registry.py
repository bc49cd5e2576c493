"""Name -> class registries for plug-in blocks and conv types.

Configs name blocks (``{type: ce}``) and convs (``conv: {type: we}``); the
backbones look them up here. A block is an ``nn.Module`` built as
``cls(channels, **options)``; its keyword arguments are its config options, so
the config loader can refuse unknown options by introspecting the signature.
"""
import difflib
import inspect

BLOCKS = {}
CONVS = {}
POSITIONS = ("after_norm", "parallel")


def _nearest(name, names):
    match = difflib.get_close_matches(str(name), list(names), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def register_block(name, positions=("after_norm",), stem=False):
    """Register a block class under ``name``.

    positions: where it may attach ('after_norm': on the residual branch after
    its last norm; 'parallel': a path fed by the shortcut output, added into the sum).
    stem: whether it may also follow the stem norm.
    """
    bad = [p for p in positions if p not in POSITIONS]
    if bad:
        raise ValueError(f"unknown block position(s) {bad}; valid: {POSITIONS}")

    def deco(cls):
        if name in BLOCKS:
            raise ValueError(f"block '{name}' is registered twice")
        cls.block_name, cls.positions, cls.stem_ok = name, tuple(positions), stem
        BLOCKS[name] = cls
        return cls
    return deco


def register_conv(name):
    """Register a conv class built as ``cls(in, out, k, stride=, padding=, groups=, bias=, **options)``."""
    def deco(cls):
        if name in CONVS:
            raise ValueError(f"conv type '{name}' is registered twice")
        cls.conv_name = name
        CONVS[name] = cls
        return cls
    return deco


def get_block(name):
    if name not in BLOCKS:
        raise KeyError(f"unknown block type '{name}'{_nearest(name, BLOCKS)}; "
                       f"registered blocks: {sorted(BLOCKS)}")
    return BLOCKS[name]


def get_conv(name):
    if name not in CONVS:
        raise KeyError(f"unknown conv type '{name}'{_nearest(name, CONVS)}; "
                       f"registered convs: {sorted(CONVS)}")
    return CONVS[name]


def options_of(cls, skip=0):
    """The keyword options of ``cls.__init__`` with their defaults (the first ``skip`` positionals excluded)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1 + skip:]
    return {p.name: p.default for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
