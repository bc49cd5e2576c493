"""Entry points: python -m tools.<name> (train, test, flops, benchmark, export, ...)."""
