"""Preemption across ranks without a blocking collective on the hot path.

Signals (SIGTERM/SIGUSR1/SIGINT) are caught by :class:`engine.guard.PreemptionGuard`,
which only sets a flag (Ctrl-C again kills at once). Every optimizer step,
:meth:`StopAgreement.poll` starts an asynchronous MAX all-reduce of the local
flag on a CPU (gloo) group and waits for the previous one, so all ranks see the
same decision at the same step with neither a device sync nor a blocking
collective per step (the decision lags the signal by one step). The trainer
then saves a checkpoint at that step and returns; ``tools/train.py`` exits with
:data:`engine.guard.EXIT_PREEMPTED` (75): run the same command again to continue.
The same CPU group carries the small object collectives of checkpointing
(per-rank RNG states, rank 0's save result).
"""
import torch
import torch.distributed as dist

from engine.distributed import is_dist
from engine.guard import PreemptionGuard


class StopAgreement:
    """Collective stop flag; every rank must call :meth:`poll` the same number of times."""

    def __init__(self):
        self.guard = PreemptionGuard()
        self.forced = False
        self._work = self._buf = None
        self.group = dist.new_group(backend="gloo") if is_dist() else None

    @property
    def signame(self):
        import signal
        return signal.Signals(self.guard.signum).name if self.guard.signum is not None else None

    @property
    def local(self):
        return self.forced or self.guard.requested

    def request(self):
        """Ask for a stop as a signal would (for tools and tests)."""
        self.forced = True

    def poll(self, sync=False):
        """True when some rank asked to stop (as of the previous poll; at once when ``sync``)."""
        self.guard.announce()
        if self.group is None:
            return bool(self.local)
        decided = False
        if self._work is not None:
            self._work.wait()
            decided = bool(self._buf.item())
            self._work = None
        if decided:
            return True
        self._buf = torch.tensor([int(self.local)], dtype=torch.int32)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        if sync:
            self._work.wait()
            self._work = None
            return bool(self._buf.item())
        return False

    def gather(self, obj):
        """``obj`` from every rank, as a list indexed by rank (a one-item list when single-process)."""
        if self.group is None:
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj, src=0):
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def close(self):
        if self._work is not None:
            self._work.wait()
            self._work = None
        self.guard.uninstall()
