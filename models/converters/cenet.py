"""Checkpoints of the CENet repository (Tangshitao/CENet).

What it saves: ``imagenet/train_imagenet.py`` calls ``devkit/core/utils.py``
``save_checkpoint`` with ``{'epoch', 'model' (the arch name, a string), 'state_dict',
'best_prec1', 'optimizer'}``; the model is not wrapped in (Distributed)DataParallel (gradients
are all-reduced by hand), so keys carry no ``module.`` prefix, though one is accepted here.
``imagenet/models/resnet_v1_ce.py`` uses torchvision names for the ResNet itself (``conv1``,
``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``; its ``AvgPool2d``/``Dropout``
hold no tensors) and adds CE modules ``ce1`` (after the stem BN) and ``layerX.Y.ce``
(stages 1-3), each of ``devkit/ops/CE_module.py`` ``CE``:

    <ce>.x_weight                (1,)            ->  <ours>.theta
    <ce>.running_mean            (g, d, 1)       ->  <ours>.running_mean        (g, d)
    <ce>.running_wm              (g, d, d)       ->  <ours>.running_wm          (g, d, d), made contiguous
    <ce>.AR.running_scale        (1,)            ->  <ours>.ir.running_scale
    <ce>.AR.fc.0.weight          (C/4, C)        ->  <ours>.ir.fc1.weight
    <ce>.AR.fc.1.weight / .bias  (C/4,)          ->  <ours>.ir.norm.weight / .bias
    <ce>.AR.fc.3.weight          (C, C/4)        ->  <ours>.ir.fc2.weight

with ``ce1`` -> ``stem_ce`` and ``layerX.Y.ce`` unchanged. Build the model with CE in stages
1-3 and after the stem (group size 64 there, 16 in the blocks) to load one strictly.
"""
import re

from models.weights import unwrap_state_dict

_CE_KEY = re.compile(
    r"^(?P<module>(?:.+\.)?ce1?)\."
    r"(?P<param>x_weight|running_mean|running_wm|AR\.running_scale|AR\.fc\.[013]\.(?:weight|bias))$")

_PARAMS = {
    "x_weight": "theta",
    "running_mean": "running_mean",
    "running_wm": "running_wm",
    "AR.running_scale": "ir.running_scale",
    "AR.fc.0.weight": "ir.fc1.weight",
    "AR.fc.1.weight": "ir.norm.weight",
    "AR.fc.1.bias": "ir.norm.bias",
    "AR.fc.3.weight": "ir.fc2.weight",
}




def _rename(key):
    """Our key for a CENet CE key, or None when ``key`` is not one."""
    m = _CE_KEY.match(key)
    if m is None:
        return None
    module = "stem_ce" if m["module"] == "ce1" else m["module"]
    return f"{module}.{_PARAMS[m['param']]}"


def detect(state_dict):
    """True when ``state_dict`` holds CENet CE tensors (``...ce.AR.running_scale``, ``...ce.x_weight``)."""
    sd = unwrap_state_dict(state_dict)
    return any(_rename(k) is not None and k.endswith(("AR.running_scale", "x_weight")) for k in sd)


def convert(state_dict, model=None):
    """Rename CENet keys to ours (``model`` is not needed); ``running_wm`` is made contiguous."""
    sd = unwrap_state_dict(state_dict)
    out = {}
    for key, value in sd.items():
        new = _rename(key)
        if new is None:
            out[key] = value
            continue
        if key.endswith("running_mean"):
            value = value.reshape(value.shape[0], -1)  # (g, d, 1) -> (g, d); a wrong g shows as a mismatch
        out[new] = value.contiguous().clone() if key.endswith("running_wm") else value
    return out
