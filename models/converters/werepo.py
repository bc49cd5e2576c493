"""Checkpoints of the WE repository (Ridwan230/pytorch-classification-weight-excitation).

What it saves: ``imagenet.py`` writes ``{'epoch', 'state_dict', 'acc', 'best_acc',
'optimizer'}`` where ``state_dict`` comes from an ``nn.DataParallel`` model, so every
key starts with ``module.``. Its ``models/imagenet/resnet.py`` (``l_resnet18`` ..
``l_resnet152``) already uses torchvision names (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``) and builds *every* conv
(stem, branch convs, downsample projections) as ``models/layers.py`` ``Conv2d``,
whose LWE MLP is two 1x1 convs with bias, ``<conv>.fc1`` (C_in/g -> max(C_in//16, 1))
and ``<conv>.fc2``. The only renaming needed is therefore

    <conv>.fc1.weight  (h, C_in/g, 1, 1)  ->  <conv>.lwe.fc1.weight  (h, C_in/g)
    <conv>.fc1.bias / fc2.weight / fc2.bias  likewise

Its ImageNet ``resnext50`` / ``resnext101`` (``models/imagenet/resnext.py``) use plain
``nn.Conv2d`` with torchvision names (its ``maxpool1`` / ``AvgPool2d(7)`` hold no
parameters): those checkpoints need no conversion and ``detect`` says False, so they
load as torchvision checkpoints into ``resnext50_32x4d`` / ``resnext101_32x4d``. The
README's ``l_resnext50`` does not exist in the code.

The repository's final commit trains LWE only (no MWE, no WS): load its checkpoints
into a model built with ``conv: {type: we, lwe: true, mwe: false, ws: false}``; a
warning says so when the model has MWE or WS switched on.
"""
import re
import warnings

from models.weights import unwrap_state_dict

_LWE_KEY = re.compile(r"^(?P<conv>.+)\.(?P<fc>fc[12])\.(?P<param>weight|bias)$")




def _lwe_match(key, state_dict):
    """The regex match when ``key`` is an LWE parameter of a conv (``<conv>.weight`` is 4-D), else None."""
    m = _LWE_KEY.match(key)
    if m is None:
        return None
    conv_weight = state_dict.get(m["conv"] + ".weight")
    return m if getattr(conv_weight, "ndim", 0) == 4 else None


def detect(state_dict):
    """True when ``state_dict`` has WE-repo LWE keys (``<conv>.fc1.weight`` beside a 4-D ``<conv>.weight``)."""
    sd = unwrap_state_dict(state_dict)
    return any(_lwe_match(k, sd) for k in sd)


def convert(state_dict, model=None):
    """Rename WE-repo keys to ours; LWE weights are reshaped to the model's shapes ((h, C_in/g))."""
    sd = unwrap_state_dict(state_dict)
    targets = model.state_dict() if model is not None else {}
    out = {}
    for key, value in sd.items():
        m = _lwe_match(key, sd)
        if m is None:
            out[key] = value
            continue
        new = f"{m['conv']}.lwe.{m['fc']}.{m['param']}"
        if m["param"] == "weight":
            shape = tuple(targets[new].shape) if new in targets else None
            value = value.reshape(shape if shape and targets[new].numel() == value.numel()
                                  else (value.shape[0], -1))
        out[new] = value
    if model is not None:
        _warn_if_not_lwe_only(model)
    return out


def _warn_if_not_lwe_only(model):
    from blocks.we import WEConv2d
    on = {opt for m in model.modules() if isinstance(m, WEConv2d)
          for opt, flag in (("mwe", m.use_mwe), ("ws", m.use_ws)) if flag}
    if on:
        warnings.warn(f"WE-repo checkpoint: the repository's final code trains LWE only, but this model "
                      f"has {' and '.join(sorted(on))} switched on; its outputs will differ unless the "
                      f"checkpoint was trained with them (set conv: {{type: we, mwe: false, ws: false}})",
                      stacklevel=2)
