"""Fine-tuning settings of the model: frozen stages and BN in eval mode (mmpretrain's conventions).

``frozen_stages=-1`` freezes nothing, ``0`` the stem, ``k`` the stem and stages 1..k: their
parameters get ``requires_grad=False`` (the optimizer skips them) and the modules stay in eval
mode, so their BN and CE running statistics do not move. ``norm_eval`` keeps every layer that
normalises with batch statistics (BatchNorm, and blocks with a ``running_mean`` buffer such as CE)
in eval mode; their affine parameters still train unless frozen. Both survive ``model.train()``
(called every epoch and after each evaluation): the model instance's ``train`` is wrapped.

The stage maps live here rather than in the backbone files and read only their structure:
ResNet / CIFAR ResNet: stem = conv1, bn1 and the stem plug-ins, stage k = ``layer{k}``;
MobileNetV2: stem = ``features[0]``, stage k = the inverted-residual blocks of SETTINGS row k
(the final 1x1 conv ``features[-1]`` belongs to no stage and is never frozen, as in mmpretrain).
"""
import types

import torch.nn as nn

from engine.fields import ConfigError

from .cifar_resnet import CifarResNet
from .mobilenetv2 import SETTINGS, MobileNetV2
from .resnet import ResNet


def stem_and_stages(model):
    """``[stem modules, stage 1 modules, ..., stage N modules]`` of a backbone (lists of modules)."""
    if isinstance(model, (ResNet, CifarResNet)):
        stem = [model.conv1, model.bn1] + [getattr(model, n) for n in model.stem_plugins]
        return [stem] + [[getattr(model, f"layer{k}")] for k in range(1, model.num_stages + 1)
                         if hasattr(model, f"layer{k}")]  # a features-only model may end early
    if isinstance(model, MobileNetV2):
        parts, start = [[model.features[0]]], 1
        for *_, n, _ in SETTINGS:
            parts.append(list(model.features[start:start + n]))
            start += n
        return parts
    raise ConfigError(f"model.frozen_stages: {type(model).__name__} has no stage map in models/finetune.py")


def frozen_modules(model, frozen_stages):
    """The modules ``frozen_stages`` freezes (none for -1)."""
    if frozen_stages < 0:
        return []
    return [m for part in stem_and_stages(model)[:frozen_stages + 1] for m in part]


def is_batch_norm(module):
    """A layer normalising with batch statistics in training: BatchNorm, or a block keeping ``running_mean`` (CE)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or "running_mean" in module._buffers


def check_finetune_cfg(model_cfg, backbone, cls):
    """Refuse a ``frozen_stages`` the backbone does not have, in one line naming the valid range."""
    k = model_cfg.get("frozen_stages", -1) if hasattr(model_cfg, "get") else -1
    if isinstance(k, bool) or not isinstance(k, int) or not -1 <= k <= cls.num_stages:
        raise ConfigError(f"model.frozen_stages={k!r} is out of range for {backbone}: -1 (nothing), 0 (the stem) "
                          f"or 1..{cls.num_stages} (the stem and stages 1..k); change it")


def apply_finetune(model, frozen_stages=-1, norm_eval=False):
    """Freeze the stem and stages 1..``frozen_stages`` and/or keep BN in eval mode; returns ``model``."""
    if frozen_stages < 0 and not norm_eval:
        return model
    for m in frozen_modules(model, frozen_stages):
        for p in m.parameters():
            p.requires_grad_(False)
    base_train = type(model).train

    def train(self, mode=True):
        base_train(self, mode)
        if mode:  # modules are looked up now: SyncBatchNorm conversion may have replaced the BN layers
            for m in frozen_modules(self, frozen_stages):
                m.eval()
            if norm_eval:
                for m in self.modules():
                    if is_batch_norm(m):
                        m.eval()
        return self

    model.train = types.MethodType(train, model)
    model.frozen_stages, model.norm_eval = frozen_stages, norm_eval
    return model.train(model.training)
