"""Suite-wide settings: one intra-op thread per test process.

Without this each test process (and every ./train.sh it starts) takes a thread per core: on a shared or busy
2-core machine the suite then runs several times slower, and pytest-xdist's workers would oversubscribe the
cores. A value the caller set (OMP_NUM_THREADS=4 python -m pytest ...) is kept.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])


def pytest_configure(config):
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
