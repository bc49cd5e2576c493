"""Samplers and the DataLoader.

Training: :class:`TrainSampler` shuffles with a generator seeded from (seed, epoch) —
the same permutation on every rank — pads like ``DistributedSampler`` so every rank
gets the same number of samples (no DDP hang), and yields ``(index, augmentation
seed)`` keys. A sample's augmentation therefore depends only on the run seed, the
epoch and its position, not on the worker or rank that loads it: runs are
reproducible from the seed whatever the worker count, workers and ranks draw
different augmentations, and a resumed epoch replays exactly.

Evaluation: :class:`ShardSampler` gives rank r the indices r, r + world, ... with no
padding, so the ranks' counts sum to ``len(dataset)`` and each image is counted
exactly once (ranks may differ by one sample: reduce sums after the loop, do not
assume equal batch counts inside it).
"""
import atexit
import ctypes
import functools
import math
import multiprocessing
import random
import signal

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler, default_collate

from core.exits import STOP_SIGNALS
from core.fields import ConfigError
from core.watchdog import worker_beat

from .errors import DataError
from .schema import resolve


def _epoch_generator(seed, epoch):
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class TrainSampler(Sampler):
    """Per-epoch shuffle, sharded over ranks (padded by repetition), yielding (index, augmentation seed)."""

    def __init__(self, size, rank=0, world_size=1, seed=0):
        self.size, self.rank, self.world_size, self.seed, self.epoch = size, rank, world_size, seed, 0
        self.num_samples = math.ceil(size / world_size)
        self.skip = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def set_skip(self, num_samples):
        """Start the next epoch after its first ``num_samples`` (mid-epoch resume; once)."""
        self.skip = int(num_samples)

    def __len__(self):
        return self.num_samples - self.skip

    def __iter__(self):
        g = _epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.size, generator=g)
        seeds = torch.randint(0, 2 ** 32, (self.size,), generator=g)   # CPU generators use 32 seed bits
        total = self.num_samples * self.world_size
        if total > self.size:                      # DistributedSampler's padding: repeat from the start
            reps = math.ceil((total - self.size) / self.size)
            order = torch.cat([order] + [order] * reps)[:total]
            seeds = torch.cat([seeds] + [seeds] * reps)[:total]
        skip, self.skip = self.skip, 0
        mine = slice(self.rank + skip * self.world_size, total, self.world_size)
        return iter(zip(order[mine].tolist(), seeds[mine].tolist()))


def start_epoch(loader, epoch, skip_batches=0):
    """Shuffle the train loader for ``epoch`` and skip its first ``skip_batches`` batches: the order is a function
    of (seed, epoch) only, so a resumed epoch sees exactly the batches an uninterrupted run still would."""
    grouped = getattr(loader.batch_sampler, "set_skip", None)  # detection's GroupedBatchSampler skips batches
    sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
    if not isinstance(sampler, TrainSampler):  # a fixed list of batches (the benchmarks): nothing to shuffle
        if skip_batches:
            raise RuntimeError(f"cannot skip batches of {type(sampler).__name__} on resume; use data.TrainSampler")
        return
    sampler.set_epoch(epoch)
    if grouped is not None:
        grouped(skip_batches)
    else:
        sampler.set_skip(skip_batches * loader.batch_size)


class ShardSampler(Sampler):
    """Indices rank, rank + world_size, ... in order; no padding, so every sample is seen exactly once."""

    def __init__(self, size, rank=0, world_size=1):
        self.size, self.rank, self.world_size = size, rank, world_size

    def set_epoch(self, epoch):
        """Evaluation order does not change between epochs."""

    def __len__(self):
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world_size))


# A stop (core.exits.STOP_SIGNALS) is decided by the training process: torchrun, SLURM and a terminal's
# Ctrl-C signal whole process groups, and a loader worker that died of it would crash the trainer before
# it could save.


@atexit.register  # runs before multiprocessing's own exit hook, which would SIGTERM (ignored) and wait forever
def _end_loader_workers():
    """At exit with loader iterators still alive (persistent workers, an error), end their workers: they hold
    nothing to save. torch's SIGCHLD handler would report each as a 'DataLoader worker ... killed' traceback."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


def seed_worker(worker_id, split="train"):
    """Ignore stop signals in a loader worker (the trainer stops it), seed python's and numpy's
    RNGs from its torch seed (base seed + worker id), and tell the watchdog it started."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    try:  # die with the trainer (killed: SIGKILL, OOM) instead of printing broken-pipe tracebacks (Linux)
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    worker_beat(split, worker_id, force=True)


def collate_and_beat(split, collate, samples):
    """``collate(samples)``, then tell the watchdog this worker made a batch (core/watchdog.py)."""
    info = torch.utils.data.get_worker_info()
    if info is not None:
        worker_beat(split, info.id)
    return collate(samples)


def build_loader(dataset, data_cfg, split, batch_size, distributed=False, seed=0):
    """DataLoader over ``dataset`` for this process (``batch_size`` is per rank).

    Batches are ``(uint8 N x 3 x H x W, int64 labels)``, pinned when CUDA is present:
    copy them with ``.to(device, non_blocking=True)`` and apply
    ``build_device_transform``. Call ``loader.sampler.set_epoch(epoch)`` before each
    epoch. Training drops the last incomplete batch; evaluation keeps every sample.
    """
    cfg = resolve(data_cfg)
    seed = 0 if seed is None else int(seed)
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"the per-rank batch size must be a positive integer, got {batch_size!r}")
    rank, world = 0, 1
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("build_loader(distributed=True) needs torch.distributed initialised first "
                              "(launch with train.sh or torchrun)")
        rank, world = dist.get_rank(), dist.get_world_size()
    train = split == "train"
    if train:
        sampler = TrainSampler(len(dataset), rank, world, seed)
        if len(sampler) < batch_size:
            raise DataError(f"the training set has {len(dataset)} images, {len(sampler)} per rank, fewer than one "
                            f"batch of {batch_size}: lower train.batch_size or use more data")
    else:
        sampler = ShardSampler(len(dataset), rank, world)
    workers = cfg["workers"]
    kwargs = {}
    if workers > 0:
        kwargs = dict(prefetch_factor=cfg["prefetch_factor"], persistent_workers=cfg["persistent_workers"])
    loading = dict(num_workers=workers, pin_memory=cfg["pin_memory"] and torch.cuda.is_available(),
                   worker_init_fn=functools.partial(seed_worker, split=split),
                   generator=torch.Generator().manual_seed(seed * 1000 + rank), **kwargs)
    collate = default_collate
    if hasattr(dataset, "aspect_ratios"):  # detection: lists of images of their own sizes
        from .coco import GroupedBatchSampler, collate
        if train:
            groups = [int(r >= 1.0) for r in dataset.aspect_ratios()]
            return DataLoader(dataset, batch_sampler=GroupedBatchSampler(sampler, groups, batch_size),
                              collate_fn=functools.partial(collate_and_beat, split, collate), **loading)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
                      collate_fn=functools.partial(collate_and_beat, split, collate), **loading)
