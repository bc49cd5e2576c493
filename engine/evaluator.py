"""Top-1/top-5/loss over a validation set, each image counted exactly once across ranks.

Every rank evaluates its shard with the *unwrapped* model (no DDP forward, so no
collective can hang when shards differ in length), accumulates
``[loss_sum, top1, top5, count]`` on the device, and one ``all_reduce`` sums
them. The shards must not overlap or pad (``data.ShardSampler``): a padding
``DistributedSampler`` would count some images twice, so it is refused.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from engine.distributed import all_reduce_sum
from engine.meters import topk_correct


def autocast_for(device, amp):
    """Autocast context for ``train.amp`` on ``device`` (a no-op for 'none').

    CPU autocast is real mixed precision too (bf16 runs fast on CPUs with AVX512-BF16/AMX, fp16
    works but slowly), so the CPU tests run the same code path as the GPU.
    """
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model, loader, device, transform=None, amp="none", on_batch=None):
    """``{'top1', 'top5', 'loss', 'count'}`` over the whole dataset behind ``loader``.

    ``model`` must be the plain module (not DDP); ``transform`` is the data's device
    transform applied to the uint8 batch after it is moved to ``device``. ``on_batch(i)``
    is called after batch ``i`` (progress for the watchdog; it may raise to stop early).
    """
    sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        raise ValueError("evaluate() counts every image once only over non-padding shards; DistributedSampler "
                         "pads them: use data.ShardSampler")
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for index, (images, target) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if transform is not None:
            images = transform(images)
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
