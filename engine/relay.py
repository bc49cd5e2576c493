"""Each process's one-line error, seen once on the console whichever rank raised it.

Under tools/launch.py (``BLOCKLAB_LAUNCHER`` and the run directory set), a rank
does not print its error: it leaves ``rank<N>.error`` in the run directory and
the launcher prints each distinct line once, naming the rank when not every
rank said the same, and exits with the code of the rank that failed first. A
process started otherwise (one process, torchrun, srun) prints it itself on
rank 0. Imports nothing heavy: the launcher uses it.
"""
import json
import os
import re
import sys

from engine.watchdog import RUN_DIR_ENV


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
    if _rank() == 0 or run_dir:
        print(line, file=sys.stderr, flush=True)


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
