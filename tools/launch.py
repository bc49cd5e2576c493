"""Start the processes of a run on this node and see them to the end:  python -m tools.launch MODULE NPROC [args ...]

Used by ``train.sh``/``test.sh`` in place of torchrun, which users found costly
and noisy: it imports torch only to start processes (seconds), signals each
worker's whole process group (which killed the data loader workers before the
trainer could save), and turns any refusal into a wall of ``ChildFailedError``.
This launcher imports nothing heavy and:

* with one process on one node, simply becomes ``python -m MODULE args``;
* otherwise starts NPROC processes with torchrun's variables (``RANK``,
  ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``; the threads per process are chosen by each process: engine/threads.py), ranks
  ``NODE_RANK * NPROC ...`` of ``NNODES * NPROC``; each in its own session, so
  a terminal's Ctrl-C or SLURM's signal to this process group reaches the
  processes once, through this launcher (which forwards SIGTERM/SIGINT/SIGUSR1
  as they are: they save at the current step and exit 75);
* when a process dies of a signal (killed, out of memory) while the others run,
  gives the others ``--grace`` seconds to notice, kills what is left and exits
  with 76 in one line; when processes exit with a code, prints each distinct
  error line the ranks left (engine/relay.py) once and exits with the code of
  the rank that failed first;
* watches the processes' progress (core/watchdog.py): when a rank or a data
  worker makes no progress for ``dist.watchdog_s``, kills the run and exits
  with 76 in one line naming the stalled process and the last step.

NPROC empty means one per visible GPU (``CUDA_VISIBLE_DEVICES``, else
``nvidia-smi -L``; 1 without GPUs). ``NNODES``/``NODE_RANK``/``MASTER_ADDR``/
``MASTER_PORT`` come from the environment (a free local port on one node).
"""
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from core.exits import EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_USAGE, STOP_SIGNALS
from core.watchdog import RUN_DIR_ENV, find_stall
from engine.relay import read_errors

GRACE_S = 30.0  # as torchrun: how long survivors of a dead rank get before they are killed


def visible_gpus():
    """GPUs this process may use, without importing torch (which takes seconds)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [d for d in env.split(",") if d.strip()]
        return 0 if not ids or ids[0].strip().startswith("-") else len(ids)
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Refused(Exception):
    """A bad launcher argument or variable (exit 2, one line)."""


def _env_int(name, default, low):
    text = os.environ.get(name, "") or str(default)
    if not text.isdigit() or int(text) < low:
        raise Refused(f"{name}={text!r} must be an integer >= {low}")
    return int(text)


def _child_setup():
    """In each process: its own session (group signals reach it through us only), SIGTERM when we die."""
    os.setsid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _end_group(pid):
    """Kill what is left of an ended process's group: data loader workers of a killed rank (they ignore SIGTERM)
    would otherwise print broken-pipe tracebacks until they notice their parent is gone."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


class Launch:
    def __init__(self, cmd, nproc, nnodes=1, node_rank=0, addr="127.0.0.1", port=None, grace=GRACE_S):
        self.cmd, self.nproc, self.grace = cmd, nproc, grace
        self.world, self.base = nnodes * nproc, node_rank * nproc
        self.addr, self.port = addr, port or free_port()
        self.procs, self.codes, self.stop_signal, self.previous = [], {}, None, {}
        self.run_dir = tempfile.mkdtemp(prefix="blocklab-run-")

    def start(self):
        self.previous = {s: signal.signal(s, self._forward) for s in STOP_SIGNALS}
        for local in range(self.nproc):
            if self.stop_signal is not None:  # stopped while starting: start no more
                break
            env = {**os.environ, "RANK": str(self.base + local), "LOCAL_RANK": str(local),
                   "WORLD_SIZE": str(self.world), "LOCAL_WORLD_SIZE": str(self.nproc),
                   "MASTER_ADDR": self.addr, "MASTER_PORT": str(self.port), "BLOCKLAB_LAUNCHER": "1",
                   RUN_DIR_ENV: self.run_dir}
            self.procs.append(subprocess.Popen(self.cmd, env=env, preexec_fn=_child_setup))

    def _forward(self, signum, frame):
        self.stop_signal = signum
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signum)

    def wait(self):
        """Exit code of the run, after every process ended; prints one line when the launcher decided it."""
        try:
            return self._wait()
        finally:
            for s, handler in self.previous.items():
                signal.signal(s, handler)
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _stalled(self):
        """Kill every process of a stalled run (SIGKILL also ends stopped ones) after saying which one stalled."""
        message = find_stall(self.run_dir)
        if message is None:
            return False
        print(f"error: {message}", file=sys.stderr, flush=True)
        for p in self.procs:
            _end_group(p.pid)
        for p in self.procs:
            p.wait()
        return True

    def _wait(self):
        failures, deadline, watched = [], None, time.monotonic()
        while len(self.codes) < len(self.procs):
            if deadline is None and time.monotonic() - watched > 1.0:  # once one ended, the rules below decide
                watched = time.monotonic()
                if self._stalled():
                    return EXIT_PEER_LOST
            for rank, p in enumerate(self.procs):
                if rank in self.codes or p.poll() is None:
                    continue
                code = self.codes[rank] = p.returncode
                _end_group(p.pid)
                if code != 0:  # the others end too (together when they agree), else they are killed
                    deadline = deadline or time.monotonic() + self.grace
                if code not in (0, EXIT_PREEMPTED) and -code != self.stop_signal:
                    failures.append(rank)
            if deadline is not None and time.monotonic() > deadline:
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
        stopped = [r for r, c in self.codes.items() if self.stop_signal and c == -self.stop_signal]
        if stopped or not self.codes:  # the forwarded signal killed a process (during setup, or Ctrl-C twice)
            print(f"stopped by {signal.Signals(self.stop_signal).name} before a checkpoint could be saved; the last "
                  "one is intact: run the same command to continue", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
        if not failures:
            return self.codes[0]
        errors = read_errors(self.run_dir, [self.base + r for r in self.codes])  # in the order they exited
        for ranks, line in errors:  # each rank's own one line, once
            said = "" if len(ranks) == self.world else f"[rank {', '.join(map(str, ranks))}] "
            print(line.replace("error: ", f"error: {said}", 1), file=sys.stderr, flush=True)
        rank = failures[0]
        code, pid, who = self.codes[rank], self.procs[rank].pid, self.base + rank
        if code < 0:
            name = signal.Signals(-code).name
            print(f"error: the process of rank {who} (pid {pid}) was killed by {name}"
                  f"{' (out of memory?)' if name == 'SIGKILL' else ''}; the run stopped without saving: run the "
                  "same command to resume from the last checkpoint", file=sys.stderr, flush=True)
            return EXIT_PEER_LOST
        if errors:
            return self.codes[errors[0][0][0] - self.base]
        if who != 0 and any(c != code for c in self.codes.values()):
            print(f"error: the process of rank {who} failed first (exit {code}; its output is above); the others "
                  "stopped", file=sys.stderr, flush=True)
        return code


def main(argv=None):
    try:
        return launch(sys.argv[1:] if argv is None else argv)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def launch(argv):
    if len(argv) < 2:
        raise Refused("usage: python -m tools.launch MODULE NPROC [args ...]  (NPROC '' = one per GPU)")
    module, nproc, args = argv[0], argv[1], argv[2:]
    if nproc == "":
        nproc = max(visible_gpus(), 1)
    elif not nproc.isdigit() or int(nproc) < 1:
        raise Refused(f"NUM_PROCS must be an integer >= 1, got {nproc!r}")
    nproc = int(nproc)
    cmd = [sys.executable, "-m", module, *args]
    nnodes = _env_int("NNODES", 1, 1)
    if nproc == 1 and nnodes == 1 and not os.environ.get("MASTER_ADDR"):
        # one process, whatever a shell or a job kept from another run (RANK, WORLD_SIZE, SLURM_NTASKS...):
        # they would make it wait for peers that never come
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        sys.stdout.flush()
        os.execv(sys.executable, cmd)
    multi = nnodes > 1 or os.environ.get("MASTER_ADDR")
    node_rank = _env_int("NODE_RANK", 0, 0)
    if node_rank >= nnodes:
        raise Refused(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
    run = Launch(cmd, nproc, nnodes, node_rank, os.environ.get("MASTER_ADDR") or "127.0.0.1",
                 _env_int("MASTER_PORT", 29500, 1) if multi else None)
    run.start()
    return run.wait()


if __name__ == "__main__":
    sys.exit(main())
