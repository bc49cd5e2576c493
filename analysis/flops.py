"""Parameters and GFLOPs of a model at its input size (``python -m tools.flops`` prints them).

Two counting conventions, both for one image in eval mode:

``macs`` (default): true multiply-accumulates (the convention of torchvision's
tables: ResNet-50 = 4.09), counted on what actually runs with
``torch.utils.flop_counter`` (convs, transposed convs, matmuls, CE's Newton
iterations; not elementwise ops).

``ednet``: the counting that reproduces the ED-Net README's GFLOPs table, i.e.
the module-hook rules of thop (Lyken17/pytorch-OpCounter, ``thop.profile``;
identical to thop 0.1.1 on every model in this repository, see
``docs/ed_variants.md``), written out here -- thop is not a dependency:

* Conv / ConvTranspose (any dimension): every *output* element costs
  ``C_in / groups * prod(kernel)``. For a convolution that is its true MACs;
  for a stride-s transposed convolution it is s^2 times them (4x at stride 2),
  because the kernel is charged at every output pixel instead of every input pixel;
* BatchNorm / SyncBatchNorm / InstanceNorm / LayerNorm: 2 per input element,
  x2 when the norm is affine (so 4 for an ordinary BatchNorm2d);
* Linear: ``in_features`` per output element;
* AdaptiveAvgPool: (input/output area ratio + 1) per output element; AvgPool: 1;
* everything else is free: activations, max pooling, additions, and any
  computation that does not run inside one of the modules above (functional
  ``torch.matmul``, ``x.mean``): thop sees modules only. A module counted by a
  rule is not searched further (thop's rule), a module run twice counts twice.

Use ``ednet`` only to compare with the ED-Net README; every other figure in
this repository (model zoo, benchmarks) is ``macs``.
"""
import copy

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

CONVENTIONS = ("macs", "ednet")


def _numel(shape):
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)
_AVGPOOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVGPOOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _ednet_rule(module):
    """The ``ednet`` counting rule for ``module`` (fn(module, x, y) -> count), or None (free / look inside)."""
    if isinstance(module, nn.modules.conv._ConvNd):   # Conv*d and ConvTranspose*d
        return lambda m, x, y: _numel(y.shape) * (x.shape[1] // m.groups) * _numel(m.kernel_size)
    if isinstance(module, _NORMS):
        def norm(m, x, y):
            affine = getattr(m, "affine", False) or getattr(m, "elementwise_affine", False)
            return 2 * _numel(x.shape) * (2 if affine else 1)
        return norm
    if isinstance(module, nn.Linear):
        return lambda m, x, y: m.in_features * _numel(y.shape)
    if isinstance(module, _ADAPTIVE_AVGPOOLS):
        def adaptive(m, x, y):
            ratio = _numel(x.shape[2:]) / _numel(y.shape[2:])   # thop: prod(in / out) per axis
            return int((ratio + 1) * _numel(y.shape))
        return adaptive
    if isinstance(module, _AVGPOOLS):
        return lambda m, x, y: _numel(y.shape)
    return None


def ednet_count(model, x):
    """Operation count of ``model(x)`` under the ``ednet`` convention (see the module docstring)."""
    total = [0]
    handles = []

    def hook_for(rule):
        def hook(m, inputs, output):
            xin, yout = _first_tensor(inputs), _first_tensor(output)
            if xin is not None and yout is not None:
                total[0] += rule(m, xin, yout)
        return hook

    def visit(module):
        rule = _ednet_rule(module)
        if rule is not None:
            handles.append(module.register_forward_hook(hook_for(rule)))
            return
        for child in module.children():
            visit(child)

    visit(model)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


def complexity(model, input_size, in_chans=3, convention="macs"):
    """(parameters, GFLOPs) of ``model`` on one ``in_chans x input_size x input_size`` image, eval mode.

    ``convention='macs'`` (default): true multiply-accumulates (torchvision's convention).
    ``convention='ednet'``: the ED-Net README's (thop's) counting; see the module docstring.
    The input is made on the device of the model's first parameter (``meta`` works).
    Weight-excited convs are counted folded: their excitation depends only on the weights, so it
    is computed once per training step (not per image) and folds away for inference.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    params = sum(p.numel() for p in model.parameters())
    from blocks.we import WEConv2d, fold_we
    if any(isinstance(m, WEConv2d) for m in model.modules()):
        model = fold_we(copy.deepcopy(model))
    first = next(model.parameters(), None)
    x = torch.zeros(1, in_chans, input_size, input_size, device=first.device if first is not None else "cpu")
    was_training = model.training
    model.eval()
    try:
        if convention == "macs":
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model(x)
            count = counter.get_total_flops() / 2
        else:
            count = ednet_count(model, x)
    finally:
        model.train(was_training)
    return params, count / 1e9


# name: (model section, input size, published params (M) or None, published GFLOPs, source)
