"""Top-1/top-5/loss over a validation set, each image counted exactly once across ranks.

Every rank evaluates its shard with the *unwrapped* model (no DDP forward, so no
collective can hang when shards differ in length), accumulates
``[loss_sum, top1, top5, count]`` on the device, and one ``all_reduce`` sums
them. A sampler that pads (``torch.utils.data.DistributedSampler`` repeats
samples so every rank gets the same number) is handled by counting only this
rank's first ``len(range(rank, N, world))`` samples: padding sits at the end of
the global index list, which rank ``r`` reads at positions ``r, r + world, ...``.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from engine.distributed import all_reduce_sum
from engine.meters import topk_correct


def _valid_per_rank(loader):
    """Real (non-padding) samples this rank sees, or None when the sampler does not pad."""
    sampler = getattr(loader, "sampler", None)
    if getattr(loader, "batch_sampler", None) is not None:
        sampler = getattr(loader.batch_sampler, "sampler", sampler)
    if not isinstance(sampler, DistributedSampler) or getattr(sampler, "drop_last", False):
        return None
    n = len(sampler.dataset)
    rank, world = sampler.rank, sampler.num_replicas
    return len(range(rank, n, world))


def autocast_for(device, amp):
    """Autocast context for ``train.amp`` on ``device`` (a no-op for 'none').

    CPU autocast is real mixed precision too (bf16 runs fast on CPUs with AVX512-BF16/AMX, fp16
    works but slowly), so the CPU tests run the same code path as the GPU.
    """
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model, loader, device, transform=None, amp="none", channels_last=False, on_batch=None):
    """``{'top1', 'top5', 'loss', 'count'}`` over the whole dataset behind ``loader``.

    ``model`` must be the plain module (not DDP); ``transform`` is the data's device
    transform applied to the uint8 batch after it is moved to ``device``. ``on_batch(i)``
    is called after batch ``i`` (progress for the watchdog; it may raise to stop early).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    budget = _valid_per_rank(loader)
    for index, (images, target) in enumerate(loader):
        if budget is not None:
            if budget <= 0:
                continue
            images, target = images[:budget], target[:budget]
            budget -= target.shape[0]
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if transform is not None:
            images = transform(images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp):
            logits = model(images)
        logits = logits.float()
        loss = F.cross_entropy(logits, target, reduction="sum")
        sums += torch.cat([loss.double().view(1), topk_correct(logits, target).double(),
                           sums.new_tensor([target.shape[0]])])
        if on_batch is not None:
            on_batch(index)
    all_reduce_sum(sums)
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    denom = max(n, 1.0)
    return {"top1": 100.0 * top1 / denom, "top5": 100.0 * top5 / denom,
            "loss": loss / denom, "count": int(round(n))}
