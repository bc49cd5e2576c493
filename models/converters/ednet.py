"""Checkpoints of the ED-Net repository (megvii-research/ED-Net).

What it saves: ``imagenet_train.py`` ``save_checkpoint`` writes ``{'epoch', 'arch'
(a string: ED50, EDX50, EDSE50, EDSEX50), 'state_dict', 'best_prec1', 'optimizer'}``
to ``<arch>.pth.tar`` (and ``<arch>best.pth.tar``); the model is wrapped in
``nn.DataParallel`` (or DistributedDataParallel), so keys start with ``module.``.

Its models (``ed_resnet.py``, ``ed_resnext.py``, ``ed_se_resnet.py``, ``ed_se_resnext.py``)
name the stem and classifier as torchvision does (``conv1``, ``bn1``, ``fc``; the
``AvgPool2d``/``Sigmoid`` hold no tensors) and each block
``layerN.layerN_block_i`` (an ``nn.Sequential`` with named children)::

    layerN.layerN_block_i.conv_convK / bn_bnK      ->  layerN.i.convK / bnK          (K = 1, 2, 3)
    ....shortcut.shortcut_conv / shortcut_bn       ->  layerN.i.downsample.0 / .1
    ....encoder.encoder_conv / encoder_bn          ->  layerN.i.ed.encoder_conv / encoder_bn
    ....decoder.decoder_conv / decoder_bn          ->  layerN.i.ed.decoder_conv / decoder_bn
    ....fc_reduction.weight (C/16, C) / .bias      ->  layerN.i.se.<first fc>   (ED-SE models)
    ....fc_extention.weight (C, C/16) / .bias      ->  layerN.i.se.<second fc>

The SE fc weights are reshaped to the model's (1x1 conv) shapes. Build the target with
``plugins: [{type: ed, position: parallel}]`` (ED-ResNet) or with ``reduction: 2`` on the
ED plugin (ED-ResNeXt-32x4d), plus ``{type: se}`` for the ED-SE models.
"""
import re

from models.weights import unwrap_state_dict

_BLOCK = re.compile(r"^layer(?P<n>\d)\.layer(?P=n)_block_(?P<i>\d+)\.(?P<rest>.+)$")
_RENAMES = (
    (re.compile(r"^conv_conv(\d)\."), r"conv\1."),
    (re.compile(r"^bn_bn(\d)\."), r"bn\1."),
    (re.compile(r"^shortcut\.shortcut_conv\."), "downsample.0."),
    (re.compile(r"^shortcut\.shortcut_bn\."), "downsample.1."),
    (re.compile(r"^encoder\.encoder_(conv|bn)\."), r"ed.encoder_\1."),
    (re.compile(r"^decoder\.decoder_(conv|bn)\."), r"ed.decoder_\1."),
)
_SE_FCS = {"fc_reduction": 0, "fc_extention": 1}




def detect(state_dict):
    """True when ``state_dict`` has ED-Net block names (``layerN.layerN_block_i.conv_conv1...``)."""
    return any(_BLOCK.match(k) for k in unwrap_state_dict(state_dict))


def _se_targets(own, block):
    """Our SE fc weight names in ``block`` (first = reduction, second = expansion), in model order."""
    prefix = f"{block}.se."
    return [k[:-len(".weight")] for k in own if k.startswith(prefix) and k.endswith(".weight")]


def _rename(key, own):
    m = _BLOCK.match(key)
    if m is None:
        return key
    block, rest = f"layer{m['n']}.{m['i']}", m["rest"]
    for pattern, repl in _RENAMES:
        new, hits = pattern.subn(repl, rest)
        if hits:
            return f"{block}.{new}"
    fc, _, param = rest.partition(".")
    if fc in _SE_FCS:
        targets = _se_targets(own, block)
        if len(targets) == 2:
            return f"{targets[_SE_FCS[fc]]}.{param}"
        return f"{block}.se.{'fc1' if _SE_FCS[fc] == 0 else 'fc2'}.{param}"
    return key


def convert(state_dict, model=None):
    """Rename ED-Net keys to ours; SE linear weights take the model's (1x1 conv) shape.

    Keys it does not know are passed through unchanged, so the loader reports them.
    """
    own = model.state_dict() if model is not None else {}
    out = {}
    for key, value in unwrap_state_dict(state_dict).items():
        new = _rename(key, own)
        target = own.get(new)
        if target is not None and value.shape != target.shape and value.numel() == target.numel():
            value = value.reshape(target.shape)
        out[new] = value
    return out
