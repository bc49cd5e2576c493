"""Stall detection: a rank or data-loader worker that makes no progress ends the run in one line (exit 76).

A stopped (SIGSTOP, Ctrl-Z, debugger) or hung process would otherwise hold the
others in a collective until ``dist.timeout_min`` (30 min) and then end in a
gloo/NCCL traceback. Each rank keeps its progress (step, phase, time of the last
step or batch) in memory; a light thread writes it every second to a small JSON
file in the run directory (``$BLOCKLAB_RUN_DIR``, created by tools/launch.py, or
by the trainer of a single process). Data-loader workers write theirs when they
start and after each batch. One observer reads the files -- tools/launch.py on
each node, or the rank's own thread when it runs alone -- and, once a rank made
no progress for ``dist.watchdog_s`` seconds, names the culprit: a process that
is stopped (``/proc/<pid>/stat``), else a worker of a rank waiting for data, else
the rank furthest behind. The first step (compilation, cuDNN autotuning) is not
watched. This module imports nothing heavy: the launcher uses it.
"""
import glob
import json
import os
import threading
import time

RUN_DIR_ENV = "BLOCKLAB_RUN_DIR"
PERIOD_S = 1.0
_SPLIT_OF_PHASE = {"data": "train", "val": "val"}  # a rank in this phase waits for that loader's workers
_PHASES = {"start": "before its first step", "data": "waiting for a training batch", "step": "in a training step",
           "val": "validating", "save": "saving a checkpoint"}
_STATES = {"T": "stopped (SIGSTOP, Ctrl-Z or a debugger)", "t": "stopped by a debugger",
           "D": "stuck in the kernel (disk or network file system)"}


def _write(path, record):
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
    except OSError:  # a full /tmp must not end the run: the watchdog just sees no news
        pass


class Heartbeat:
    """A rank's progress, written by a daemon thread; ``beat(step, phase)`` on the hot path only sets attributes."""

    def __init__(self, run_dir, rank, watchdog_s, observe=False, on_stall=None):
        self.path = os.path.join(run_dir, f"rank{rank}.json")
        self.run_dir, self.rank, self.watchdog_s = run_dir, rank, watchdog_s
        self.step, self.phase, self.progress_t, self.armed = 0, "start", time.time(), False
        self.observe, self.on_stall = observe, on_stall
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blocklab-watchdog", daemon=True)

    def start(self):
        if self.watchdog_s:
            self._thread.start()
        return self

    def beat(self, step=None, phase=None):
        """Progress was made (a step or a batch); ``phase`` says what comes next ('data', 'step', 'val', 'save')."""
        self.progress_t = time.time()
        if step is not None:
            self.armed = self.armed or step > self.step
            self.step = step
        if phase is not None:
            self.phase = phase

    def _run(self):
        while not self._done.wait(PERIOD_S):
            _write(self.path, {"pid": os.getpid(), "rank": self.rank, "step": self.step, "phase": self.phase,
                               "progress_t": self.progress_t, "armed": self.armed, "watchdog_s": self.watchdog_s})
            if self.observe:
                message = find_stall(self.run_dir)
                if message is not None and self.on_stall is not None:
                    self.on_stall(message)

    def stop(self):
        if not self._thread.is_alive():
            return
        self._done.set()
        self._thread.join()
        for p in (self.path, f"{self.path}.tmp"):
            if os.path.exists(p):
                os.remove(p)


_last_worker_write = [0.0]


def worker_beat(split, worker_id, force=False):
    """In a data-loader worker of the ``split`` loader: record progress (at most once a second, or now: ``force``)."""
    run_dir = os.environ.get(RUN_DIR_ENV)
    now = time.time()
    if not run_dir or (not force and now - _last_worker_write[0] < PERIOD_S):
        return
    _last_worker_write[0] = now
    rank = os.environ.get("RANK", "0") or "0"
    _write(os.path.join(run_dir, f"rank{rank}-worker{worker_id}-{os.getpid()}.json"),
           {"pid": os.getpid(), "rank": int(rank), "worker": worker_id, "split": split, "progress_t": now})


def proc_state(pid):
    """The kernel's one-letter state of ``pid`` (R, S, D, T, Z...), or None when it is gone or unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _who(rec):
    if "worker" in rec:
        return f"data worker {rec['worker']} of rank {rec['rank']} (pid {rec['pid']})"
    return f"rank {rec['rank']} (pid {rec['pid']})"


def find_stall(run_dir, now=None):
    """One line naming the stalled process when a watched rank made no progress for its ``watchdog_s``, else None."""
    now = time.time() if now is None else now
    records = [r for r in map(_read, sorted(glob.glob(os.path.join(run_dir, "*.json")))) if r]
    ranks = [r for r in records if "worker" not in r]
    stalled = [r for r in ranks if r.get("armed") and r["watchdog_s"] and now - r["progress_t"] > r["watchdog_s"]]
    if not stalled:
        return None
    limit = stalled[0]["watchdog_s"]
    ranks = [r for r in ranks if proc_state(r["pid"]) not in (None, "Z")]
    waiting = {(r["rank"], _SPLIT_OF_PHASE[r["phase"]]) for r in ranks if r["phase"] in _SPLIT_OF_PHASE}
    workers = [r for r in records if "worker" in r and (r["rank"], r["split"]) in waiting
               and proc_state(r["pid"]) not in (None, "Z")]
    stopped = [r for r in ranks + workers if proc_state(r["pid"]) in _STATES]
    if stopped:
        culprit, why = stopped[0], _STATES[proc_state(stopped[0]["pid"])]
    elif workers:  # a rank waits for a batch while the others wait for it in a collective
        culprit, why = min(workers, key=lambda r: r["progress_t"]), "hung (no batch)"
    else:  # the rank furthest behind; the others wait for it in a collective
        culprit, why = min(ranks or stalled, key=lambda r: (r["step"], r["progress_t"])), "hung"
    rank = next((r for r in ranks if r["rank"] == culprit["rank"]), culprit)
    idle = now - rank["progress_t"]
    return (f"watchdog: {_who(culprit)} is {why}: rank {rank['rank']} made no progress for {idle:.0f} s "
            f"(last step {rank.get('step', '?')}, {_PHASES.get(rank.get('phase'), '?')}); the run was ended "
            f"without saving: run the same command to resume from the last checkpoint (the limit is "
            f"dist.watchdog_s={limit:g})")
