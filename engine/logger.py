"""Run logging on rank 0: console (and ``<work_dir>/log.txt``), tensorboardX scalars, JSON lines.

``<work_dir>/metrics.jsonl`` gets one object per logged event, e.g.
``{"kind": "train", "epoch": 3, "step": 1200, "loss": 0.41, "lr": 0.1, ...}`` and
``{"kind": "val", "epoch": 3, "step": 1250, "top1": 76.1, "top5": 92.9, "loss": 0.95}``;
tensorboard scalars go to ``<work_dir>/tb`` as ``train/<name>`` and ``val/<name>``
against the optimizer step. Other ranks get a logger that only prints warnings.

A file the run appends to while it trains (``log.txt``, ``metrics.jsonl``, the tensorboard events) that
cannot be written (a full disk, a quota, a file system remounted read-only) ends the run with
:class:`engine.checkpoint.CheckpointError` (exit 74) naming the file and the fix, not a traceback or
a run that goes on without its logs; the checkpoints already written are untouched.
"""
import errno
import json
import logging
import os
import sys
import threading

LOG_NAME = "blocklab"


def get_logger():
    return logging.getLogger(LOG_NAME)


_SPACE = (errno.ENOSPC, errno.EDQUOT)


def write_failed(path, exc):
    """The one-line error (a CheckpointError: exit 74) for ``path`` that could not be appended to."""
    from engine.checkpoint import CheckpointError
    folder = os.path.dirname(os.path.abspath(path))
    if isinstance(exc, OSError) and exc.errno in _SPACE:
        why = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        fix = f"free space in {folder} or pick another runtime.work_dir"
    elif isinstance(exc, OSError) and exc.errno == errno.EROFS:
        why, fix = "read-only file system", f"remount {folder} read-write or pick another runtime.work_dir"
    else:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        fix = f"fix {folder} or pick another runtime.work_dir"
    return CheckpointError(f"could not write {path}: {why}; {fix}, then run the same command to resume from "
                           f"the last checkpoint (it is intact)")


def _close_quietly(stream):
    try:
        stream.close()  # flushes what the failed write left in the buffer: fails again, but closes the file
    except (OSError, ValueError):
        pass


class _RunLogFile(logging.FileHandler):
    """``log.txt``: a write that fails ends the run (raised from the logging call in the main thread) instead of
    logging's '--- Logging error ---' traceback on every later line."""

    def __init__(self, path):
        super().__init__(path)
        self.failed = None  # the error to raise, once
        self.raised = False

    def emit(self, record):
        if self.failed is None:
            super().emit(record)
        self._raise_in_main()

    def handleError(self, record):
        exc = sys.exc_info()[1]
        if self.stream is not None:
            stream, self.stream = self.stream, None
            _close_quietly(stream)
        self.failed = write_failed(self.baseFilename, exc)

    def _raise_in_main(self):
        if self.failed is not None and not self.raised and threading.current_thread() is threading.main_thread():
            self.raised = True
            raise self.failed

    def flush(self):
        if self.failed is None:  # a failed flush is caught by emit (handleError)
            super().flush()

    def close(self):
        if self.stream is not None and self.failed is None:
            try:
                self.stream.flush()
            except OSError:
                pass
        if self.stream is not None:
            stream, self.stream = self.stream, None
            _close_quietly(stream)
        logging.Handler.close(self)


def setup_console(rank=0, log_file=None):
    """Configure the ``blocklab`` logger: INFO on rank 0, WARNING elsewhere; optional file copy."""
    log = get_logger()
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S") if rank == 0 else \
        logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    log.addHandler(h)
    if log_file is not None and rank == 0:
        fh = _RunLogFile(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)
    return log


class RunLogger:
    """Scalars to tensorboardX and ``metrics.jsonl`` (rank 0 only; a no-op elsewhere)."""

    def __init__(self, work_dir, enabled=True, tensorboard=True):
        self.enabled = enabled
        self.tb = None
        self.tb_error = None  # an OSError of tensorboardX's writer thread
        self.jsonl = None
        self.tb_dir = os.path.join(work_dir, "tb")
        if not enabled:
            return
        self.jsonl = open(os.path.join(work_dir, "metrics.jsonl"), "a", buffering=1, encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(self.tb_dir, flush_secs=30)
            self._guard_tb()

    def _guard_tb(self):
        """tensorboardX writes the events in a thread that dies on a write error, after which its full queue
        blocks the training loop for ever: catch the error there, and raise it from the next :meth:`log`."""
        try:
            events = self.tb._get_file_writer().event_writer._ev_writer
        except AttributeError:  # another tensorboardX: unguarded
            return
        for name in ("write_event", "flush"):
            write = getattr(events, name, None)
            if write is None:
                continue

            def guarded(*args, _write=write, **kwargs):
                if self.tb_error is not None:
                    return None
                try:
                    return _write(*args, **kwargs)
                except OSError as e:
                    self.tb_error = e
                    return None
            setattr(events, name, guarded)

    def log(self, kind, step, scalars, **info):
        """Record ``scalars`` (name -> number) under ``kind`` ('train', 'val', 'test') at ``step``."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), **info,
                  **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in scalars.items()}}
        if self.jsonl is not None:
            try:
                self.jsonl.write(json.dumps(record) + "\n")  # line-buffered: a full disk raises here
            except OSError as e:
                jsonl, self.jsonl = self.jsonl, None
                _close_quietly(jsonl)
                raise write_failed(jsonl.name, e) from None
        if self.tb is not None and self.tb_error is not None:
            tb, self.tb = self.tb, None
            self._close_tb(tb)
            raise write_failed(self.tb_dir, self.tb_error) from None
        if self.tb is not None:
            try:
                for name, value in scalars.items():
                    self.tb.add_scalar(f"{kind}/{name}", value, step)
            except OSError as e:
                tb, self.tb = self.tb, None
                self._close_tb(tb)
                raise write_failed(self.tb_dir, e) from None

    @staticmethod
    def _close_tb(tb):
        try:
            tb.close()
        except (OSError, ValueError):
            pass

    def close(self):
        """Close the files (never raises: it runs while the run ends, maybe because a write failed)."""
        if self.tb is not None:
            self._close_tb(self.tb)
            self.tb = None
        if self.jsonl is not None:
            _close_quietly(self.jsonl)
            self.jsonl = None
