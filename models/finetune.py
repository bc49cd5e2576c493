"""Fine-tuning settings of the model: frozen stages and BN in eval mode (mmpretrain's conventions).

``frozen_stages=-1`` freezes nothing, ``0`` the stem, ``k`` the stem and stages 1..k: their
parameters get ``requires_grad=False`` (the optimizer skips them) and the modules stay in eval
mode, so their BN and CE running statistics do not move. ``norm_eval`` keeps every layer that
normalises with batch statistics (BatchNorm, and blocks with a ``running_mean`` buffer such as CE)
in eval mode; their affine parameters still train unless frozen. Both survive ``model.train()``
(called every epoch and after each evaluation), a deepcopy (EMA) and a pickled whole model: the
backbones' ``train`` is :class:`FinetuneMixin`'s, reading the model's ``frozen_stages``/``norm_eval``.

Each backbone says what its stem and stages are (``stem_and_stages()``): ResNet / CIFAR ResNet:
stem = conv1, bn1 and the stem plug-ins, stage k = ``layer{k}``; MobileNetV2: stem =
``features[0]``, stage k = the inverted-residual blocks of SETTINGS row k (the final 1x1 conv
``features[-1]`` belongs to no stage and is never frozen, as in mmpretrain).
"""
import torch.nn as nn

from core.fields import ConfigError


class FinetuneMixin:
    """``train()`` that keeps frozen stages (and, with ``norm_eval``, batch-statistics layers) in eval mode."""

    frozen_stages = -1
    norm_eval = False

    def stem_and_stages(self):
        """``[stem modules, stage 1 modules, ..., stage N modules]`` (lists of modules); backbones define it."""
        raise ConfigError(f"model.frozen_stages: {type(self).__name__} does not say what its stages are "
                          f"(define stem_and_stages())")

    def train(self, mode=True):
        super().train(mode)
        if mode:  # modules are looked up now: SyncBatchNorm conversion may have replaced the BN layers
            for m in frozen_modules(self, self.frozen_stages):
                m.eval()
            if self.norm_eval:
                for m in self.modules():
                    if is_batch_norm(m):
                        m.eval()
        return self


def frozen_modules(model, frozen_stages):
    """The modules ``frozen_stages`` freezes (none for -1)."""
    if frozen_stages < 0:
        return []
    return [m for part in model.stem_and_stages()[:frozen_stages + 1] for m in part]


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
    model.frozen_stages, model.norm_eval = frozen_stages, norm_eval
    return model.train(model.training)
