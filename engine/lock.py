"""One run per work directory: an exclusive ``flock`` on ``<work_dir>/.lock``, held for the whole run.

A requeued cluster job that starts while the old one still runs would otherwise
write every log line twice and resume from the other run's checkpoints. The
lock file records its holder (host, pid, start time) so that a refused run can
name it. The operating system releases a ``flock`` when its holder dies, so a
crashed or killed run leaves no stale lock (on NFS a dead client's lock lasts
until its lease expires, about 90 s).
"""
import fcntl
import json
import os
import socket
import time

from core.fields import ConfigError

LOCK_NAME = ".lock"
_HELD = set()  # descriptors of the locks this process holds


def _forget_in_child():
    """A forked child (a data loader worker) must not keep its parent's lock alive after the parent died."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class WorkDirBusy(ConfigError):
    """Another run holds the work directory."""


def _holder(fd):
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}", info
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not written its name yet", {}


class WorkDirLock:
    """``acquire()`` creates ``work_dir`` and takes the lock or raises :class:`WorkDirBusy`; ``release()`` frees it."""

    def __init__(self, work_dir):
        self.work_dir = os.fspath(work_dir)
        self.path = os.path.join(self.work_dir, LOCK_NAME)
        self.fd = self.pid = None

    def acquire(self):
        if os.path.exists(self.work_dir) and not os.path.isdir(self.work_dir):
            raise NotADirectoryError(f"work_dir {self.work_dir} is a file, not a directory; "
                                     "pick another runtime.work_dir")
        try:
            os.makedirs(self.work_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(f"work_dir {self.work_dir} is not writable: {e.strerror or e}; "
                          "pick another runtime.work_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who, info = _holder(fd)
            os.close(fd)
            stop = f"stop it (kill -TERM {info['pid']} on {info['host']}: it saves and exits) or " if info else ""
            raise WorkDirBusy(f"work_dir {self.work_dir} is in use by another run ({who}); wait for it to finish, "
                              f"{stop}pick another runtime.work_dir") from None
        except OSError:  # a file system without locks: run unprotected rather than not at all
            os.close(fd)
            return self
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode() + b"\n", 0)
        self.fd, self.pid = fd, os.getpid()
        _HELD.add(fd)
        return self

    def release(self):
        if self.fd is not None and self.pid == os.getpid():  # (a forked child closed its copy at the fork)
            os.close(self.fd)  # closing the last descriptor releases the flock
            _HELD.discard(self.fd)
        self.fd = None

    __del__ = release

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
