"""Preemption and non-finite-loss guards for the training loop.

Exit codes and stop signals live in ``core/exits.py`` (torch-free, shared with the launcher).

``PreemptionGuard`` turns stop signals into a flag; ``engine.preempt.StopAgreement`` makes all ranks
agree on the step to stop at. ``NonFiniteGuard.step_ok(loss, step)`` skips an update whose loss is
nan/inf (all ranks agree) and stops the run after too many in a row.
"""
import logging
import math
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from core.exits import STOP_SIGNALS
from engine.logger import LOG_NAME

log = logging.getLogger(LOG_NAME)  # rank 0 prints info; every rank warnings



def _dist_active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce_device():
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


class PreemptionGuard:
    """Turn SIGTERM / SIGUSR1 / SIGINT (cluster preemption, ``scancel``, SLURM ``--signal``, Ctrl-C) into a flag.

    The handlers only set a flag (:attr:`requested`); the loop polls it through
    ``engine.preempt.StopAgreement``, saves a checkpoint of the current step and exits with 75.
    Once stopping, a SIGINT (Ctrl-C again) arriving more than ``repeat_after``
    seconds after the first signal restores the default action and re-raises it
    (stop now: the atomic save keeps earlier checkpoints intact). Repeated
    SIGTERM/SIGUSR1 are ignored: SLURM and torchrun signal every process *and*
    the launcher forwards it, at moments a loaded machine can set seconds apart,
    and both follow up with SIGKILL themselves. Handlers are restored on
    :meth:`uninstall` / leaving the ``with``. Outside the main thread (where
    Python cannot install handlers) the guard is inert and says so.
    """

    def __init__(self, signals=STOP_SIGNALS, repeat_after=1.0):
        self.signals = tuple(s for s in signals if s is not None)
        self.repeat_after = repeat_after
        self.signum = None
        self._first = None
        self._previous = {}
        self._announced = False

    @property
    def requested(self):
        """True once a signal arrived in this process (no communication with other ranks)."""
        return self.signum is not None

    def _handle(self, signum, frame):
        # No logging here: the signal can land while the loop itself writes to the console, and a second write
        # to that stream from the handler fails ("reentrant call inside BufferedWriter"). announce() logs it.
        now = time.monotonic()
        if self.signum is not None:
            if signum != signal.SIGINT or now - self._first < self.repeat_after:
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum, self._first = signum, now

    def announce(self):
        """Log the stop signal once, from the loop (the first poll after it arrived)."""
        if self.signum is not None and not self._announced:
            self._announced = True
            log.info('received %s: saving at the end of this step or validation batch (Ctrl-C again stops at once)',
                     signal.Signals(self.signum).name)

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            log.warning('PreemptionGuard: not in the main thread, signals are not handled')
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()
        return False


class NonFiniteError(RuntimeError):
    """Training stopped because the loss stayed nan/inf; the message names the step and the last good checkpoint."""


class NonFiniteGuard:
    """Skip optimizer updates whose loss is nan/inf; stop after ``max_skips`` in a row.

    ``step_ok(loss, step)`` returns True when the loss is finite (take the step),
    False when the update should be skipped (zero the grads, do not step the
    optimizer or scheduler), and raises :class:`NonFiniteError` on the
    ``max_skips + 1``-th consecutive bad step. ``max_skips=0`` stops at the first.
    In distributed runs the flag is all-reduced so that every rank skips the same
    steps (a rank that skipped backward alone would hang DDP): call it on every
    rank before ``backward``. ``checkpoints`` (a CheckpointManager, or a callable
    returning a path) names the last good checkpoint in the message.
    """

    def __init__(self, max_skips=3, checkpoints=None):
        if max_skips < 0:
            raise ValueError(f'max_skips must be >= 0, got {max_skips}')
        self.max_skips = int(max_skips)
        self.checkpoints = checkpoints
        self.consecutive = 0
        self.total = 0
        self.last_good_step = None

    def _last_checkpoint(self):
        c = self.checkpoints
        if c is None:
            return None
        if callable(c):
            return c()
        return c.last_good()

    def step_ok(self, loss, step):
        if isinstance(loss, torch.Tensor):
            finite = torch.isfinite(loss.detach()).all().float().reshape(1)
            if _dist_active():
                finite = finite.to(_reduce_device())
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            ok = bool(finite.item() > 0)
            value = None if ok or loss.numel() != 1 else float(loss.detach())
        else:
            ok = math.isfinite(float(loss))
            value = float(loss)
        if ok:
            self.consecutive = 0
            self.last_good_step = step
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive > self.max_skips:
            last = self._last_checkpoint()
            what = 'non-finite' if value is None or math.isfinite(value) else repr(value)
            raise NonFiniteError(
                f'loss was {what} at step {step}, {self.consecutive} steps in a row '
                f'(limit train.max_nonfinite={self.max_skips}); last finite step {self.last_good_step}; '
                f'last good checkpoint: {last or "none saved yet"}; lower the lr, add grad clipping '
                'or disable amp, then resume from it')
        log.warning('loss is not finite at step %s: skipping this update (%d in a row, limit %d)',
                    step, self.consecutive, self.max_skips)
        return False
