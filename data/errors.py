"""The error raised for unusable data: a missing file, a bad list line, an unreadable image."""
from engine.fields import ConfigError


class DataError(ConfigError):
    """A dataset file or entry that cannot be used; one line naming the file (and line) and the fix.

    It subclasses :class:`ConfigError` so the entry points report both the same way.
    Raised in a DataLoader worker, it reaches the main process with its type intact
    (the worker's traceback is prepended to the message; the last line is ours).
    """
