"""Channel Equilibrium (CE) block.

Shao, Tang, Pan, Tan, Wang, Luo, "Channel Equilibrium Networks for Learning Deep
Representation", ICML 2020 (arXiv:2003.00214); matches the released code, Tangshitao/CENet
``devkit/ops/CE_module.py`` (``CE``, ``AdaptiveReweight``) as used in ``resnet_v1_ce.py``.

    CE(X) = sigmoid(theta) * BD(X) + (1 - sigmoid(theta)) * IR(X),   theta initialised to 0,

with BD the batch decorrelation (Newton iterations towards Sigma_N^-1/2 over groups of
``group_channels`` channels; the running whitening matrix in eval) and IR the instance
reweighting (an MLP of each sample's channel variances). Both are linear in X per sample, so
the block applies one block-diagonal matrix per sample with one batched matmul (``ce_ops``).
docs/ce.md gives the computation, the NHWC path, distributed statistics and every place this
code deliberately differs from the original, with the reason.
"""
import copy
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ce_ops import (CentredMoments, CentredMomentsNHWC, GradLink, Mix, MixNHWC, all_reduce_sum, mix_nhwc,
                     newton_isqrt, per_sample_kernels, sample_group_matmul, sample_mats,
                     variance_from_sums)
from .registry import Block, Option, log_adjustment, register_block


def _group_size(channels, group_channels):
    """BD's group size: ``group_channels`` halved until it divides ``channels``, as CENet's CE_module.py
    does; a change is logged once (docs/blocks.md)."""
    d = max(int(group_channels), 1)
    while channels % d:
        d //= 2
    if d != group_channels:
        log_adjustment(f"ce: group_channels={group_channels} does not divide {channels} channels; "
                       f"using {d} there (halved until it divides, as CENet does)")
    return d


@torch.fx.wrap
def _ce_forward(block, x):
    """CE's forward; torch.fx records it as one call, so the memory-format branch runs on real tensors.

    Autocast is off inside (float32 statistics); on the meta device (shape and FLOPs counting) there
    is no autocast to switch off, and torch.autocast refuses that device type.
    """
    with torch.autocast(device_type=x.device.type, enabled=False) if x.device.type != "meta" else nullcontext():
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return block._forward_nhwc(x)
        return block._forward_nchw(x)



class InstanceReweight(nn.Module):
    """IR branch gains y_n / s from per-sample channel variances (``AdaptiveReweight`` in CENet)."""

    def __init__(self, channels, reduction=4, momentum=0.1):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, channels, bias=False)
        self.momentum = momentum
        self.register_buffer("running_scale", torch.ones(1))

    def gains(self, var):
        """(N, C) variances -> (N, C) channel gains y (before the division by s)."""
        return torch.sigmoid(self.fc2(F.relu(self.norm(self.fc1(var)))))


@register_block("ce", positions=("after_norm",), stem=True)
class CE(Block):
    """Channel Equilibrium: sigmoid(theta) * BD(x) + (1 - sigmoid(theta)) * IR(x) (see module doc).

    channels: C. group_channels: BD group size G (halved until it divides C; logged).
    newton_iters: T. pooling: estimate BD statistics on a 2x2 max-pooled input.
    momentum / eps: running-average momentum and the covariance ridge (original: 0.1 / 1e-5).
    reduction: IR bottleneck ratio. sync_stats: all-reduce statistics across ranks.
    stem_group_channels: G used when the block follows the stem norm (original: 64).
    """

    no_weight_decay = ("theta",)  # the BD/IR mixing logit: exempt with train.wd_exempt: [marked]

    OPTIONS = {
        "group_channels": Option(int, low=1, doc="BD group size G (channels whitened together); where G does not "
                                 "divide the block's channels it is halved until it does (CENet's rule), and the "
                                 "value used is logged"),
        "newton_iters": Option(int, low=0, doc="Newton iterations T of the inverse square root "
                               "(0: no whitening, P = I)"),
        "pooling": Option(bool, doc="estimate BD's statistics on a 2x2/stride-2 max-pooled input (needs maps of "
                          "at least 2x2)"),
        "momentum": Option(float, low=0, high=1, doc="momentum of the running whitening matrix and IR scale"),
        "eps": Option(float, low=0, low_open=True, doc="ridge added to the covariance; floor of IR's mean variance"),
        "reduction": Option(int, low=1, doc="IR bottleneck ratio r (hidden width max(C // r, 1); the original "
                            "hard-codes 4)"),
        "sync_stats": Option(bool, doc="all-reduce BD/IR statistics across ranks (global-batch statistics, like "
                             "SyncBatchNorm); false: per-GPU, as the original"),
        "stem_group_channels": Option(int, low=1, doc="G of the instance after the stem norm (stem: true); "
                                      "halved like group_channels where it does not divide the stem's channels"),
    }

    @classmethod
    def min_side(cls, pooling=False, **options):
        """Smallest feature map side the options allow: pooling takes 2x2 maxima, so 2."""
        return 2 if pooling else 1

    def __init__(self, channels, group_channels=16, newton_iters=3, pooling=False, momentum=0.1,
                 eps=1e-5, reduction=4, sync_stats=False, stem_group_channels=64):
        super().__init__()
        self.channels = channels
        self.group_channels = _group_size(channels, group_channels)
        self.num_groups = channels // self.group_channels
        self.newton_iters = newton_iters
        self.pooling = pooling
        self.momentum = momentum
        self.eps = eps
        self.sync_stats = sync_stats
        self.stem_group_channels = stem_group_channels
        g, d = self.num_groups, self.group_channels
        self.ir = InstanceReweight(channels, reduction, momentum)
        self.theta = nn.Parameter(torch.zeros(1))
        self.register_buffer("running_mean", torch.zeros(g, d))
        self.register_buffer("running_wm", torch.eye(d).repeat(g, 1, 1))

    @classmethod
    def stem_options(cls, **options):
        """Options for the instance after the stem norm: G = ``stem_group_channels``."""
        options = dict(options)
        options["group_channels"] = options.get("stem_group_channels", 64)
        return options

    def reset_running_stats(self):
        self.running_mean.zero_()
        self.running_wm.copy_(torch.eye(self.group_channels).expand_as(self.running_wm))
        self.ir.running_scale.fill_(1.0)

    def extra_repr(self):
        return (f"{self.channels}, groups={self.num_groups}x{self.group_channels}, "
                f"newton_iters={self.newton_iters}, pooling={self.pooling}, momentum={self.momentum}, "
                f"eps={self.eps}, sync_stats={self.sync_stats}")

    def deploy(self):
        """Inference form of the eval block: BD as a fixed grouped 1x1 conv (:class:`CEInference`)."""
        return CEInference(self)

    def _batch_stats(self, x, gram, sums_c, shift, var):
        """Whitening matrix P_T (g, d, d) and IR scale s of the batch; updates the running buffers.

        gram / sums_c: Gram matrices summed over samples (g, d, d) and per-sample channel sums
        (N*g*d values) of the BD source (x, or x max-pooled) minus the constant per-sample shift
        (N*g*d values); var: (N*g*d values) per-sample variances of x.
        """
        n, _, h, w = x.shape
        g, d = self.num_groups, self.group_channels
        m, nvar = n * h * w, n * self.channels
        hw_src = (h // 2) * (w // 2) if self.pooling else h * w
        mp = n * hw_src
        sums_c, shift = sums_c.view(n, g, d), shift.view(n, g, d)
        total = (sums_c + hw_src * shift).sum(0)
        var_sum = var.sum().view(1)
        if self.sync_stats:  # the scatter below needs the global mean: reduce sums first
            counts = total.new_tensor([m, mp, nvar])
            flat = all_reduce_sum(torch.cat([total.flatten(), var_sum, counts]))
            total, var_sum, counts = flat.split([g * d, 1, 3])
            total, (m, mp, nvar) = total.view(g, d), counts.unbind()
        mean = total / mp
        # scatter about the batch mean = sum_n [exactly centred per-sample scatter + u_n u_n^T / hw],
        # u_n = sum over H*W of (x_n - mean) = sums_c + hw * (shift - mean): one baddbmm for both terms
        u = sums_c + hw_src * (shift - mean)
        left = torch.cat([u, sums_c]).permute(1, 2, 0)          # (g, d, 2n)
        right = torch.cat([u, -sums_c]).permute(1, 0, 2)        # (g, 2n, d)
        scatter = torch.baddbmm(gram, left, right, alpha=1.0 / hw_src)
        if self.sync_stats:
            scatter = all_reduce_sum(scatter)
        eye = torch.eye(d, dtype=scatter.dtype, device=scatter.device)
        sigma = self.eps * eye + scatter / m
        trace = sigma.diagonal(dim1=1, dim2=2).sum(1).view(g, 1, 1)
        wm = newton_isqrt(sigma / trace, self.newton_iters)
        scale = (var_sum / nvar).clamp_min(self.eps).sqrt()  # >= sqrt(eps): no spatial variance (1x1 maps)
        with torch.no_grad():  # a non-finite batch (a step GradScaler will skip) leaves the buffers as they are
            updates = ((self.running_mean, mean, self.momentum), (self.running_wm, wm, self.momentum),
                       (self.ir.running_scale, scale, self.ir.momentum))
            finite = torch.stack([torch.isfinite(val).all() for _, val, _ in updates]).all()
            for buf, val, mom in updates:
                buf.copy_(torch.where(finite, torch.lerp(buf, val.detach().to(buf.dtype), mom), buf))
        return wm, scale

    def forward(self, x):
        return _ce_forward(self, x)

    def _gains(self, var, scale, n):
        """IR's gains (1 - a) y / s as (N, C) and the mixing weight a = sigmoid(theta)."""
        sdt = scale.dtype
        y = self.ir.gains(var.view(n, self.channels).to(self.ir.fc1.weight.dtype)).to(sdt)
        a = torch.sigmoid(self.theta.to(sdt))
        return (1 - a) * y / scale, a

    @staticmethod
    def _stats_dtype(x):
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def _forward_nchw(self, x):
        n, c, h, w = x.shape
        g, d, hw = self.num_groups, self.group_channels, h * w
        xg = x.reshape(n * g, d, hw)  # a view
        sdt = self._stats_dtype(x)
        if self.training:
            link = None if torch.compiler.is_compiling() else GradLink()
            gram_c, sums_c, shift, xct = CentredMoments.apply(xg, sdt, link)
            var = variance_from_sums(sums_c, gram_c.diagonal(dim1=1, dim2=2), hw)
            stats = gram_c, sums_c, shift
            if self.pooling:
                stats = CentredMoments.apply(F.max_pool2d(x, 2, 2).reshape(n * g, d, -1), sdt)[:3]
            wm, scale = self._batch_stats(x, stats[0].view(n, g, d, d).sum(0), *stats[1:], var)
        else:
            shift = xg.detach().sum(2, keepdim=True, dtype=sdt) / hw
            var = torch.linalg.vector_norm(torch.sub(xg, shift), dim=2).square() / max(hw - 1, 1)
            wm, scale = self.running_wm.to(sdt), self.ir.running_scale.to(sdt)
        gain, a = self._gains(var, scale, n)
        mix = (a * wm + torch.diag_embed(gain.view(n, g, d))).view(n * g, d, d)  # W_n per group
        if self.training:
            out = Mix.apply(xg, mix, xct, shift, link)
        else:
            out = torch.bmm(mix.to(x.dtype), xg)
        return out.view(n, c, h, w)

    def _forward_nhwc(self, x):
        """The same block on channels_last memory, without NCHW copies (see ce_ops.MixNHWC)."""
        n, c, h, w = x.shape
        g, hw = self.num_groups, h * w
        x3 = x.permute(0, 2, 3, 1).reshape(n, hw, c)  # a view
        sdt = self._stats_dtype(x)
        if self.training:
            link = None if torch.compiler.is_compiling() else GradLink()
            gram, sumsq, sums_c, shift, xc = CentredMomentsNHWC.apply(x3, g, sdt, link)
            var = variance_from_sums(sums_c, sumsq, hw)
            stats = gram, sums_c, shift
            if self.pooling:
                pooled = F.max_pool2d(x, 2, 2).permute(0, 2, 3, 1)
                p_gram, _, p_sums, p_shift, _ = CentredMomentsNHWC.apply(pooled.reshape(n, -1, c), g, sdt)
                stats = p_gram, p_sums, p_shift
            wm, scale = self._batch_stats(x, *stats, var)
            gain, a = self._gains(var, scale, n)
            out = MixNHWC.apply(x3, a * wm, gain, xc, shift, link)
        elif per_sample_kernels(x):  # the centred copy that gives the variances becomes the output
            shift = x3.sum(1, keepdim=True, dtype=sdt) / hw
            buf = torch.sub(x3, shift)
            var = buf.square_().sum(1) / max(hw - 1, 1)
            gain, a = self._gains(var, self.ir.running_scale.to(sdt), n)
            out = sample_group_matmul(x3, sample_mats(a * self.running_wm.to(sdt), gain),
                                      buf if buf.dtype == x.dtype else torch.empty_like(x3))
        else:
            shift = x3.sum(1, keepdim=True, dtype=sdt) / hw
            var = torch.sub(x3, shift).square().sum(1) / max(hw - 1, 1)
            gain, a = self._gains(var, self.ir.running_scale.to(sdt), n)
            out = mix_nhwc(x3, a * self.running_wm.to(sdt), gain)
        return out.view(n, h, w, c).permute(0, 3, 1, 2)


class CEInference(nn.Module):
    """CE in eval (``CE.deploy()``): the BD matrix a * running_wm as a constant, IR's gains on its diagonal.

    Per sample n, CE's eval output is W_n x with W_n = a P + diag((1 - a) y_n / s) per group
    (a = sigmoid(theta), P = running_wm, s = running_scale, y_n = IR MLP of x_n's channel variances).
    a P is fixed at eval and stored (``bd``, the weight of a grouped 1x1 conv); IR's part depends on
    the sample, so W_n is built per sample and applied with one batched matmul, as CE does. A grouped
    conv for a P plus a separate ``x * gain`` term was measured slower (one more activation-sized pass).
    Statistics in float32 (float64 for float64 input) as in CE. Unlike CE's eval forward, which exports
    right only through torch.export (torch.diag_embed has no ONNX op; a trace at a 1x1 map fixes
    max(H*W - 1, 1)), every step here is an ONNX op and H*W - 1 comes from a tensor, so traced files
    stay right at every input size.
    """

    def __init__(self, ce):
        super().__init__()
        g, d = ce.num_groups, ce.group_channels
        self.channels, self.num_groups, self.group_channels = ce.channels, g, d
        sdt = torch.float64 if ce.running_wm.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            a = torch.sigmoid(ce.theta.detach().to(sdt))
            self.register_buffer("bd", (a * ce.running_wm.to(sdt)).clone())                 # (g, d, d)
            self.register_buffer("ir_factor", ((1 - a) / ce.ir.running_scale.to(sdt)).clone())
            self.register_buffer("eye", torch.eye(d, dtype=sdt))
        self.ir = copy.deepcopy(ce.ir).eval()  # fc1 -> LayerNorm -> ReLU -> fc2 -> sigmoid
        self.ir.requires_grad_(False)

    def forward(self, x):
        sdt = self.bd.dtype
        xf = x.flatten(2)                                                     # (n, c, hw)
        hw_minus_1 = torch.ones_like(xf[:1, :1], dtype=sdt).sum() - 1
        var = torch.linalg.vector_norm(xf - xf.mean(2, keepdim=True, dtype=sdt), dim=2).square()
        var = var / hw_minus_1.clamp_min(1)                                   # unbiased; biased at 1x1 as CE
        gain = self.ir.gains(var.to(self.ir.fc1.weight.dtype)).to(sdt) * self.ir_factor
        mix = self.bd + gain.unflatten(1, (self.num_groups, self.group_channels)).unsqueeze(-1) * self.eye
        out = torch.matmul(mix.to(x.dtype), xf.unflatten(1, (self.num_groups, self.group_channels)))
        return out.reshape(x.shape)                                          # contiguous NCHW

    def extra_repr(self):
        return f"{self.channels}, groups={self.num_groups}x{self.group_channels}"
