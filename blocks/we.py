"""Weight Excitation (WE): attention applied to a conv's weights, not its activations.

Quader et al., "Weight Excitation: Built-in Attention Mechanisms in
Convolutional Neural Networks", ECCV 2020. For a conv weight W of shape
(C_out, C_in/g, k, k), ``WEConv2d`` convolves with the excited weight

1. WS (optional, off by default) -- weight standardisation of each filter:
   ``W_o <- (W_o - mean(W_o)) / (std(W_o) + 1e-5)`` over its C_in/g*k*k entries
   (unbiased std, eps added to the std, as the original does).
2. LWE, location-based weight excitation (paper, "Location-based weight
   excitation"): for each output filter W_o, the spatial mean of each kernel
   (a C_in/g vector) goes through an MLP shared by all filters of the layer,
   ``FC1 (C_in/g -> max(C_in // 16, 1), bias) -> ReLU -> FC2 (-> C_in/g, bias) -> sigmoid``,
   giving one gate per (output, input) kernel: ``W'_{o,i} = m_{o,i} * W_{o,i}``.
   The hidden width uses the *full* C_in (``in_channels // reduction``), as the original does.
3. MWE, magnitude-based weight excitation (paper, "Magnitude-based weight
   excitation"), applied after LWE: ``W' = M_A * artanh(W / M_A)`` with
   ``M_A = (1 + 0.1) * max|W|`` over the whole tensor of the layer. It boosts
   the gradient of large-magnitude weights; |W / M_A| <= 1/1.1 keeps artanh finite.

The excited weight depends on parameters only, so it is computed once per forward
(not per sample), in the parameters' precision even under autocast. MWE (with the
LWE product) is one autograd Function with a hand-written backward, a few passes
over the weight instead of ~20 autograd ops. In eval mode without autograd the
excited weight is cached until a parameter changes (version counters), and
``fold_we`` bakes it into plain ``nn.Conv2d`` layers (same outputs, plain-conv cost). ``.weight`` / ``.bias`` stay the raw parameters (torchvision keys
still match); the LWE MLP lives in the ``lwe`` submodule (``conv1.lwe.fc1.weight``).

Original (unofficial) code: Ridwan230/pytorch-classification-weight-excitation,
``models/layers.py`` ``Conv2d``. Its final commit runs LWE only (WS and MWE are
commented out there; the LWE+MWE+WS variant sits in a string at the end of the
file): to reproduce that code use ``{type: we, lwe: true, mwe: false, ws: false}``.
Deliberate differences: the original skips MWE on the first forward call of each
layer (a ``self.count`` flag, not saved in checkpoints, so a reloaded model also
skips MWE on its first evaluation batch); here MWE is applied on every call.
``M_A`` is clamped away from 0 so an all-zero weight gives zeros, not NaN.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .fusion import swap_modules
from .registry import Option, register_conv

__all__ = ["LWE", "WEConv2d", "fold_we"]

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


@torch.fx.wrap
def _we_forward(conv, x):
    """``WEConv2d.forward``; torch.fx records it as one call, so the device, grad-mode and cache
    checks that pick the weight run at call time, not while tracing."""
    return conv._conv_forward(x, conv._weight_for_call(), conv.bias)


class _FC(nn.Module):
    """A fully connected layer of the LWE MLP.

    Not an ``nn.Linear`` / ``nn.Conv2d`` on purpose: backbone init loops that
    re-initialise those types must leave the LWE MLP at its own default init
    (PyTorch's default for a 1x1 conv, as in the original).
    """

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


class LWE(nn.Module):
    """Location-based WE gates: (C_out, C_in/g, k, k) weight -> (C_out, C_in/g, 1, 1) gates in (0, 1)."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.fc1 = _FC(channels, hidden)
        self.fc2 = _FC(hidden, channels)

    def forward(self, weight):
        z = _kernel_sum(weight) * (1.0 / (weight.shape[2] * weight.shape[3]))  # (C_out, C_in/g) kernel means
        z = F.relu(self.fc1(z))
        return torch.sigmoid(self.fc2(z))[:, :, None, None]


def standardize_weight(weight, eps=1e-5):
    """Weight standardisation per output filter (unbiased std, eps added to the std)."""
    w = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
    return w / (w.flatten(1).std(dim=1).view(-1, 1, 1, 1) + eps)


def magnitude_excite(weight, margin=0.1, gate=None):
    """MWE: ``M_A * artanh(U / M_A)`` with ``U = weight * gate`` (``U = weight`` when ``gate`` is None)
    and ``M_A = (1 + margin) * max|U|`` over the tensor; differentiable wrt ``weight`` and ``gate``.

    ``gate`` is the LWE gate tensor (C_out, C_in/g, 1, 1), entries in (0, 1). Taking the
    product inside lets the backward (``_MagnitudeExcite``) avoid storing ``U``.
    """
    return _MagnitudeExcite.apply(weight, gate, float(margin))


def _dot(a, b):
    """sum(a * b) without a temporary when both are contiguous."""
    if a.is_contiguous() and b.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1))
    return (a * b).sum()


def _kernel_sum(weight):
    """Sum of each k x k kernel, shape (C_out, C_in/g) (a view for 1x1 kernels)."""
    if weight.shape[2] * weight.shape[3] == 1:
        return weight.flatten(1)
    return weight.sum(dim=(2, 3))


def _rows(t):
    """``t`` (4-D) as (C_out, -1) in memory order, and the dim order of the columns (a view)."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1), (2, 3, 1)
    return t.contiguous().view(t.shape[0], -1), (1, 2, 3)


class _MagnitudeExcite(torch.autograd.Function):
    """``out = M * atanh(z)``, ``z = U / M``, ``U = W * gate``, ``M = c * max|U|`` (clamped to > 0).

    The same function and gradients as writing it with autograd ops, in a few passes
    over the weight instead of ~20. With ``q = 1 - z^2`` and ``G = dL/d out``:
    ``dL/dU = G / q``, plus ``c * sign(U_top) * sum(G * (atanh(z) - z / q))`` at the
    largest-magnitude entry ``U_top`` (the gradient through ``M``), where
    ``atanh(z) = out / M`` reuses the saved output. If several entries tie for the
    largest magnitude, that term goes to one of them (autograd's ``amax`` would
    split it; both are valid subgradients).
    """

    @staticmethod
    def forward(ctx, weight, gate, margin):
        u = weight * gate if gate is not None else weight.clone()
        rows, order = _rows(u)
        col_hi, col_lo = rows.amax(0), rows.amin(0)               # per column of the (C_out, -1) view
        col = torch.maximum(col_hi, -col_lo).argmax().view(1)     # (tensor indexing: no graph break)
        hi, lo = col_hi.index_select(0, col), col_lo.index_select(0, col)
        top = torch.where(hi >= -lo, hi, lo)                      # signed value of the largest |U|
        row = (rows.index_select(1, col) == top).view(-1).to(torch.uint8).argmax().view(1)  # first row
        sizes = [u.shape[d] for d in order]
        index = dict(zip(order, torch.unravel_index(col, sizes)))
        index = (row, index[1], index[2], index[3])
        tiny = torch.finfo(u.dtype).tiny
        m = ((1.0 + margin) * top.abs()).clamp_min(tiny)
        z = u.mul_(1.0 / m)                                       # U / M, in place
        out = torch.atanh(z).mul_(m)
        # dM / dU_top: c * sign(U_top), or 0 where the clamp is active (an all-zero weight)
        dm = torch.where(top.abs() * (1.0 + margin) >= tiny, (1.0 + margin) * torch.sign(top), 0.0)
        ctx.save_for_backward(weight, gate, z, out, m, dm, *index)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, gate, z, out, m, dm, *index = ctx.saved_tensors
        gu = torch.addcmul(torch.ones((), dtype=z.dtype, device=z.device), z, z, value=-1)  # 1 - z^2
        gu = torch.div(grad, gu, out=gu)                          # G / (1 - z^2)
        grad_m = _dot(grad, out) / m - _dot(gu, z)                # sum(G * d out / d M)
        gu.index_put_(tuple(index), grad_m * dm, accumulate=True)
        if gate is None:
            return gu, None, None
        if weight.shape[2] * weight.shape[3] == 1:
            grad_gate = gu * weight
        else:
            grad_gate = torch.einsum("oikl,oikl->oi", gu, weight)[:, :, None, None]
        return gu.mul_(gate), grad_gate, None


@register_conv("we")
class WEConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is excited by WS -> LWE -> MWE before each convolution.

    Options (config ``model.conv``): ``lwe`` / ``mwe`` / ``ws`` switch the three
    steps; ``reduction`` is the LWE MLP's reduction ratio r (hidden width
    ``max(in_channels // r, 1)``); ``mwe_margin`` is the paper's epsilon_A
    (``M_A = (1 + mwe_margin) * max|W|``); ``ws_eps`` is WS's epsilon.
    """

    OPTIONS = {
        "lwe": Option(bool, doc="location-wise excitation: a per-filter gate from an MLP on the weights"),
        "mwe": Option(bool, doc="magnitude-based excitation of every weight (M_A = (1 + mwe_margin) * max|W|)"),
        "ws": Option(bool, doc="weight standardisation before LWE/MWE (needs >= 2 weights per filter)"),
        "reduction": Option(int, low=1, requires="lwe", doc="LWE MLP reduction ratio r: hidden width "
                            "max(C_in // r, 1)"),
        "mwe_margin": Option(float, low=0, low_open=True, requires="mwe", doc="the paper's epsilon_A of MWE"),
        "ws_eps": Option(float, low=0, low_open=True, requires="ws", doc="epsilon of weight standardisation"),
    }

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1,
                 bias=False, dilation=1, lwe=True, mwe=True, ws=False, reduction=16,
                 mwe_margin=0.1, ws_eps=1e-5):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        if reduction < 1:
            raise ValueError(f"WE reduction must be >= 1, got {reduction}")
        if mwe_margin <= 0:
            raise ValueError(f"WE mwe_margin must be > 0 (artanh needs |W/M_A| < 1), got {mwe_margin}")
        if ws and self.weight[0].numel() < 2:
            raise ValueError(f"WE ws: true needs >= 2 weights per filter to standardise; this conv "
                             f"({in_channels}->{out_channels}, k={self.kernel_size}, groups={groups}) "
                             f"has 1: set ws: false or exclude this conv role")
        self.use_lwe, self.use_mwe, self.use_ws = bool(lwe), bool(mwe), bool(ws)
        self.reduction, self.mwe_margin, self.ws_eps = int(reduction), float(mwe_margin), float(ws_eps)
        self.lwe = LWE(in_channels // groups, max(in_channels // reduction, 1)) if lwe else None
        self._cache = None  # (parameter versions, excited weight), used in eval without grad

    def reset_parameters(self):
        super().reset_parameters()
        if getattr(self, "lwe", None) is not None:
            self.lwe.fc1.reset_parameters()
            self.lwe.fc2.reset_parameters()

    def excited_weight(self):
        """The weight this layer convolves with (differentiable wrt ``weight`` and the LWE MLP)."""
        w = self.weight
        dev = w.device.type
        ctx = torch.autocast(dev, enabled=False) if dev in _AUTOCAST_DEVICES else contextlib.nullcontext()
        with ctx:  # excitation in parameter precision; only the conv itself follows autocast
            if self.use_ws:
                w = standardize_weight(w, self.ws_eps)
            gate = self.lwe(w) if self.lwe is not None else None
            if self.use_mwe:
                w = magnitude_excite(w, self.mwe_margin, gate)
            elif gate is not None:
                w = w * gate
        return w

    def forward(self, x):
        return _we_forward(self, x)

    def _weight_for_call(self):
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.excited_weight()
        # eval without autograd: reuse the excited weight while the parameters are unchanged
        # (an in-place update, load_state_dict or .to() changes a version, pointer or dtype)
        key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in self._excite_params())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.excited_weight())
        return self._cache[1]

    def _excite_params(self):
        return [self.weight] + (list(self.lwe.parameters()) if self.lwe is not None else [])

    def to_plain(self):
        """A plain ``nn.Conv2d`` holding the excited weight (for inference)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, groups=self.groups,
                         bias=self.bias is not None, padding_mode=self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.excited_weight())
            conv.weight.requires_grad_(self.weight.requires_grad)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
                conv.bias.requires_grad_(self.bias.requires_grad)
        conv.train(self.training)
        return conv

    def extra_repr(self):
        return (super().extra_repr() + f", lwe={self.use_lwe}, mwe={self.use_mwe}, ws={self.use_ws}"
                + (f", reduction={self.reduction}" if self.use_lwe else "")
                + (f", mwe_margin={self.mwe_margin}" if self.use_mwe else ""))

    def deploy(self):
        """Inference form (models.inference.to_inference): the plain conv of ``to_plain``."""
        return self.to_plain()


def fold_we(model):
    """Replace every ``WEConv2d`` in ``model`` (in place) by a plain ``nn.Conv2d`` with its excited weight.

    The folded model computes the same outputs at plain-conv cost and has the
    parameter names of the plain backbone (the ``lwe.*`` parameters are gone).
    It is meant for inference: training it trains the excited weights directly.
    Returns ``model`` (or the replacement, when ``model`` itself is a ``WEConv2d``).
    """
    if isinstance(model, WEConv2d):
        return model.to_plain()
    swap_modules(model, lambda m: m.to_plain() if isinstance(m, WEConv2d) else None)
    return model
