"""The bottom layer: what every other package may import (no torch, nothing of ours).

``fields`` (ConfigError, Field and its value check), ``names`` (the nearest valid name),
``config`` (YAML loading, ``_base_``, overrides, the one validator) and ``exits`` (exit codes
and stop signals, shared with the torch-free launcher).
"""
