"""The error raised for unusable data: a missing file, a bad list line, an unreadable image."""
from core.fields import ConfigError


class DataError(ConfigError):
    """A dataset file or entry that cannot be used; one line naming the file (and line) and the fix.

    It subclasses :class:`ConfigError` so the entry points report both the same way.
    Raised in a DataLoader worker, it reaches the main process with its type intact
    (the worker's traceback is prepended to the message; the last line is ours).
    """


def worker_lost(exc):
    """One line for torch's error about a DataLoader worker that died (killed: out of memory, SIGKILL), else None.

    The run cannot continue and has nothing new to save: entry points exit 76 with this line."""
    text = str(exc)
    if "DataLoader worker" not in text or not ("killed by signal" in text or "exited unexpectedly" in text):
        return None
    how = text.split("DataLoader worker", 1)[1].split(".")[0].strip().replace("is killed", "was killed")
    return (f"a data loader worker {how} (out of memory? a bus error from a full /dev/shm?); lower data.workers or "
            "data.prefetch_factor, or give the job more memory or shared memory; run the same command to resume "
            "from the last checkpoint")
