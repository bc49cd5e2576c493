"""Each process's one-line error, seen once on the console whichever rank raised it.

Under tools/launch.py (``BLOCKLAB_LAUNCHER`` and the run directory set), a rank
does not print its error: it leaves ``rank<N>.error`` in the run directory and
the launcher prints each distinct line once, naming the rank when not every
rank said the same, and exits with the code of the rank that failed first. A
process started otherwise (one process, torchrun, srun) prints it itself: each
distinct line once per node (the first rank to claim it in a small file under
$TMPDIR, keyed by the run), ``error: [rank N] ...`` when a rank other than 0
printed it. Imports nothing heavy: the launcher uses it.
"""
import hashlib
import json
import os
import re
import sys
import tempfile
import time

from core.watchdog import RUN_DIR_ENV


def _rank():
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


_WORKER = re.compile(r"Caught \w+ in DataLoader worker process (\d+)\.")


def one_line(line):
    """``line`` without the traceback torch adds to an error raised in a DataLoader worker: its own last line,
    naming the worker."""
    if "\n" not in line:
        return line
    first, last = line.splitlines()[0], line.rstrip().splitlines()[-1]
    prefix = first[:first.index(": ") + 2] if first.startswith("error: ") else ""
    reason = re.sub(r"^[\w.]+: ", "", last)
    worker = _WORKER.search(first)
    return f"{prefix}{reason}{f' (in data worker {worker.group(1)})' if worker else ''}"


def report_error(line):
    """Show ``line`` ('error: ...') to the user once, in one line: through the launcher, or printed on rank 0."""
    line = one_line(line)
    run_dir = os.environ.get(RUN_DIR_ENV) if os.environ.get("BLOCKLAB_LAUNCHER") else None
    if run_dir and os.path.isdir(run_dir):
        try:
            with open(os.path.join(run_dir, f"rank{_rank()}.error"), "w") as f:
                json.dump({"rank": _rank(), "line": line}, f)
            return
        except OSError:  # no room for the file: print it here instead
            pass
    if run_dir:
        print(line, file=sys.stderr, flush=True)
        return
    rank, world = _rank(), int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if world > 1:  # torchrun / srun without tools/launch.py: every rank may hold the only copy of its error
        if rank:
            time.sleep(0.3)  # rank 0, when it failed the same way, claims the line first (no rank named)
        if not _claim(line):
            return
        if rank and line.startswith("error: ") and not line.startswith("error: [rank"):
            line = f"error: [rank {rank}] {line[len('error: '):]}"
    print(line, file=sys.stderr, flush=True)


def _run_key():
    """What the ranks of one run on one node share: the scheduler's ids, the rendezvous address, and the parent
    process (torchrun's agent, slurmstepd) with its start time (a pid can be reused)."""
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = ""
    names = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID", "MASTER_ADDR", "MASTER_PORT")
    return "|".join([os.environ.get(n, "") for n in names] + [str(parent), started])


def _claim(line):
    """True for the first process of this run (on this node) to report ``line``."""
    folder = os.path.join(tempfile.gettempdir(), f"blocklab-errors-{os.getuid()}")
    name = hashlib.sha256(f"{_run_key()}\n{line}".encode()).hexdigest()[:32]
    try:
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:  # no room to claim it: print it anyway
        return True
    return True


def read_errors(run_dir, order):
    """``[(ranks, line)]`` left by the ranks, one per distinct line, in ``order`` (the order the ranks exited)."""
    out = {}
    for rank in order:
        try:
            with open(os.path.join(run_dir, f"rank{rank}.error")) as f:
                line = json.load(f)["line"]
        except (OSError, ValueError, KeyError):
            continue
        out.setdefault(line, []).append(rank)
    return [(ranks, line) for line, ranks in out.items()]
