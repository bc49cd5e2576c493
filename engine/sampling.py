"""Resuming mid-epoch: make the train loader skip the batches an epoch has already done.

The index order of an epoch is a function of (seed, epoch) only, so skipping the
first ``n`` batches reproduces exactly the batches an uninterrupted run would
still see. A sampler that offers ``set_skip(num_samples)`` is asked to do it;
any other sampler is wrapped (in the loader's ``BatchSampler``) by
:class:`SkipSampler`, which drops the first indices it yields.
"""
from torch.utils.data import BatchSampler, Sampler


class SkipSampler(Sampler):
    """Yields ``sampler``'s indices after the first ``skip``; forwards ``set_epoch``."""

    def __init__(self, sampler, skip=0):
        self.sampler, self.skip = sampler, skip

    def set_epoch(self, epoch):
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def set_skip(self, num_samples):
        self.skip = int(num_samples)

    def __iter__(self):
        for i, idx in enumerate(self.sampler):
            if i >= self.skip:
                yield idx

    def __len__(self):
        return max(len(self.sampler) - self.skip, 0)


def unwrap_sampler(loader):
    """The index sampler of ``loader`` (inside its batch sampler when there is one)."""
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    return inner if inner is not None else loader.sampler


def set_skip(loader, num_batches):
    """Skip the first ``num_batches`` batches of the loader's next epoch (0 to skip none)."""
    bs = getattr(loader, "batch_sampler", None)
    sampler = unwrap_sampler(loader)
    batch = getattr(bs, "batch_size", None) or loader.batch_size or 1
    if hasattr(sampler, "set_skip"):
        sampler.set_skip(num_batches * batch)
    elif hasattr(bs, "set_skip"):
        bs.set_skip(num_batches)
    elif num_batches:
        if not isinstance(bs, BatchSampler):
            raise RuntimeError(f"cannot skip batches of {type(bs or sampler).__name__}; give it set_skip()")
        bs.sampler = SkipSampler(sampler, num_batches * batch)
