"""The bottom layer: what every other package may import (no torch, nothing of ours).

``fields`` (ConfigError, Field and its value check), ``names`` (the nearest valid name),
``config`` (YAML loading, ``_base_``, overrides, the one validator), ``exits`` (exit codes and
stop signals) and ``watchdog`` (progress files and stall detection): the last two are shared by
the training processes, their data workers and the torch-free launcher.
"""
