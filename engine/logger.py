"""Run logging on rank 0: console (and ``<work_dir>/log.txt``), tensorboardX scalars, JSON lines.

``<work_dir>/metrics.jsonl`` gets one object per logged event, e.g.
``{"kind": "train", "epoch": 3, "step": 1200, "loss": 0.41, "lr": 0.1, ...}`` and
``{"kind": "val", "epoch": 3, "step": 1250, "top1": 76.1, "top5": 92.9, "loss": 0.95}``;
tensorboard scalars go to ``<work_dir>/tb`` as ``train/<name>`` and ``val/<name>``
against the optimizer step. Other ranks get a logger that only prints warnings.
"""
import json
import logging
import os
import sys

LOG_NAME = "blocklab"


def get_logger():
    return logging.getLogger(LOG_NAME)


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
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)
    return log


class RunLogger:
    """Scalars to tensorboardX and ``metrics.jsonl`` (rank 0 only; a no-op elsewhere)."""

    def __init__(self, work_dir, enabled=True, tensorboard=True):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        self.tb_dir = os.path.join(work_dir, "tb")
        if not enabled:
            return
        self.jsonl = open(os.path.join(work_dir, "metrics.jsonl"), "a", buffering=1, encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(self.tb_dir, flush_secs=30)

    def log(self, kind, step, scalars, **info):
        """Record ``scalars`` (name -> number) under ``kind`` ('train', 'val', 'test') at ``step``."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), **info,
                  **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
