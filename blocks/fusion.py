"""Fusion helpers for the blocks' inference forms: swapping modules in place and folding BatchNorm.

A block whose eval computation has a cheaper or more exportable form offers it through a
``deploy()`` method returning the replacement module (like RepVGG's ``switch_to_deploy``), defined
beside the block: ``WEConv2d.deploy()`` (a plain conv), ``CE.deploy()`` (``blocks.ce.CEInference``),
``ED.deploy()`` (``blocks.ed.EDInference``). ``models.inference.to_inference`` walks a model with
:func:`swap_modules` and swaps them in; :func:`fold_bn` folds an eval BatchNorm into the conv that
feeds it (exact up to rounding). docs/deployment.md explains the forms.
"""
import collections
import copy

import torch
import torch.nn as nn


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
