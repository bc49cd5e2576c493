"""CPU threads per process (``runtime.threads``): set once at start, logged in one line.

PyTorch's default is one intra-op thread per physical core in *every* process, so
two processes on two cores run four threads, and a single process on a machine
shared with others competes with them for every core. The choice, first that applies:

1. ``runtime.threads`` when set;
2. ``OMP_NUM_THREADS`` when the environment sets it (the user's or the scheduler's choice);
3. the cores this process may use (its CPU affinity: ``taskset``, cgroup cpusets, SLURM's
   ``--cpus-per-task``) divided by the processes on this node, at least 1 and at most
   ``MAX_AUTO`` (beyond that a data-parallel process gains little and starves the data workers);
   but 1 when the machine is already busy at start (1-minute load average >= those cores): threads
   that wait for cores other jobs hold make every step wait for the slowest. Measured on a shared
   2-core machine at load 15: the default config's step took 46 s with 2 threads and 14 s with 1,
   and 5.3 s of CPU instead of 0.9 s (docs/get_started.md).
"""
import os

import torch

MAX_AUTO = 8


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def local_processes():
    """Processes of this run on this node (tools/launch.py and torchrun set LOCAL_WORLD_SIZE; srun its own)."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def choose_threads(setting, environ=None):
    """(threads, why) for the ``runtime.threads`` ``setting`` (None: automatic)."""
    environ = os.environ if environ is None else environ
    if setting:
        return setting, "runtime.threads"
    omp = environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), f"OMP_NUM_THREADS={omp}"
    cores, procs = available_cores(), local_processes()
    threads = max(1, min(cores // procs, MAX_AUTO))
    where = f"{cores} core{'s' * (cores != 1)}, {procs} process{'es' * (procs != 1)}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if threads > 1 and load >= cores:
        return 1, f"{where}; busy machine: load {load:.1f}, set runtime.threads to use more"
    return threads, where


def set_threads(setting):
    """Apply the choice to torch; returns the line to log, e.g. ``threads: 1 per process (2 cores, 2 processes)``."""
    threads, why = choose_threads(setting)
    torch.set_num_threads(threads)
    return f"threads: {threads} per process ({why})"
