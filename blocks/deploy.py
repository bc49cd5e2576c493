"""Inference forms of the blocks: what ``deploy()`` returns (DESIGN.md, "Inference form").

A block whose eval computation has a cheaper or more exportable form offers it through a
``deploy()`` method returning the replacement module (like RepVGG's ``switch_to_deploy``);
``models.inference.to_inference`` walks a model and swaps them in. The replacements are eval-only
(they read the running statistics once) and written functionally, so torch.jit.trace, ONNX and
torch.export see the computation eager runs:

* ``WEConv2d.deploy()`` -> ``nn.Conv2d`` with the excited weight (``WEConv2d.to_plain``);
* ``CE.deploy()`` -> :class:`CEInference`: BD with the running whitening matrix is a fixed linear
  map (sigmoid(theta) * running_wm, the weight of a grouped 1x1 conv), stored once; IR's gains depend
  on each sample's channel variances, so the IR MLP stays and adds them on the diagonal;
* ``ED.deploy()`` -> :class:`EDInference`: both BNs folded into their (transposed) convs.

:func:`fold_bn` folds an eval BatchNorm into the conv that feeds it (exact up to rounding).
"""
import collections
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ed import decode_to


def swap_modules(model, replace):
    """Swap, in place, every submodule of ``model`` for which ``replace(module)`` returns a module (the
    new one is not searched further); a module shared by two parents stays shared. Returns the class
    names of the swapped modules, counted. ``fold_we`` and ``models.inference`` walk models with it."""
    counts, done = collections.Counter(), {}

    def visit(parent):
        for name, child in list(parent.named_children()):
            if id(child) not in done:
                new = replace(child)
                if new is None:
                    visit(child)
                    continue
                done[id(child)] = new
                counts[type(child).__name__] += 1
            setattr(parent, name, done[id(child)])
    visit(model)
    return counts


def fold_bn(conv, bn):
    """A copy of ``conv`` (Conv2d or ConvTranspose2d) with eval-mode ``bn`` applied to its output folded in.

    bn(conv(x)) = s * conv(x) + (beta - s * mean), s = gamma / sqrt(var + eps): the per-output-channel
    scale goes into the weight (for a grouped transposed conv, weight (C_in, C_out/g, k, k) holds group
    i's C_out/g outputs along dim 1) and the shift into the bias. Computed in float64, stored in the
    conv's dtype.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn: the BatchNorm tracks no running statistics; nothing fixed to fold")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"fold_bn: BatchNorm over {bn.num_features} channels after a conv with "
                         f"{conv.out_channels} outputs")
    fused = copy.deepcopy(conv)
    w64 = conv.weight.detach().double()
    scale = (bn.weight.detach().double() if bn.affine else torch.ones_like(bn.running_var, dtype=torch.float64))
    scale = scale * torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = (bn.bias.detach().double() if bn.affine else 0) - scale * bn.running_mean.double()
    if isinstance(conv, nn.ConvTranspose2d):
        g = conv.groups
        w = (w64.view(g, -1, conv.out_channels // g, *w64.shape[2:])
             * scale.view(g, 1, -1, *[1] * (w64.dim() - 2))).view_as(w64)
    else:
        w = w64 * scale.view(-1, *[1] * (w64.dim() - 1))
    bias = shift if conv.bias is None else conv.bias.detach().double() * scale + shift
    with torch.no_grad():
        fused.weight.copy_(w)
        if fused.bias is None:
            fused.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        else:
            fused.bias.copy_(bias)
    return fused.train(False)


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


class EDInference(nn.Module):
    """ED in eval (``ED.deploy()``): encoder conv+BN and decoder transposed conv+BN folded.

    The decoder's folded bias is added after the transposed conv, not passed to it: on CPU a
    grouped transposed conv with a bias runs a slower kernel (ED-ResNet-50 at 224 px, 1 thread:
    the folded model took 1.5x the eager one's time with the bias inside).
    """

    def __init__(self, ed):
        super().__init__()
        self.encoder_conv = fold_bn(ed.encoder_conv, ed.encoder_bn)
        self.decoder_conv = fold_bn(ed.decoder_conv, ed.decoder_bn)
        self.register_buffer("decoder_bias", self.decoder_conv.bias.detach().clone().view(1, -1, 1, 1))
        self.decoder_conv.bias = None

    def forward(self, x):
        # BN is per channel, so folded into the decoder it commutes with decode_to's crop
        return decode_to(self.decoder_conv, F.relu(self.encoder_conv(x)), x) + self.decoder_bias
