"""Synchronised BatchNorm that also runs on CPU (gloo), for ``train.sync_bn``.

``torch.nn.SyncBatchNorm`` only works on GPUs, so on CUDA the engine uses it and
on CPU it uses :class:`CPUSyncBatchNorm`: in training, batch statistics are taken
over the global batch of all ranks with one autograd-aware all-reduce of
``[sum n_r*mean_r, sum n_r*mean_r^2, sum M2_r, N]`` (per-rank centred sums of
squares, so no catastrophic cancellation), and the running statistics are
updated exactly like BatchNorm over the global batch (unbiased variance). In
eval mode, or in a single process, it is plain BatchNorm.
"""
import torch
import torch.distributed as dist
import torch.nn as nn


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x):
        sync = (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)
        if not sync:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        n = x.numel() // c
        xf = x.float()
        mean_r = xf.mean(dims)
        m2_r = ((xf - mean_r.view(1, c, *[1] * (x.dim() - 2))) ** 2).sum(dims)
        count = torch.full((1,), float(n), dtype=torch.float32, device=x.device)
        stats = all_reduce(torch.cat([n * mean_r, n * mean_r * mean_r, m2_r, count]))
        total = stats[-1]
        mean = stats[:c] / total
        m2 = stats[2 * c:3 * c] + stats[c:2 * c] - total * mean * mean
        var = m2 / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * total / max(float(total) - 1, 1.0)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module, device_type):
    """BatchNorm layers -> ``nn.SyncBatchNorm`` on CUDA, :class:`CPUSyncBatchNorm` elsewhere."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device_type))
    return out

