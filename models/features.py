"""Multi-scale features for dense prediction: ``feature_info`` and the features-only mode.

Every backbone lists the maps a detector or segmenter can take (timm's ``feature_info``):
one dict ``{index, module, num_chs, reduction}`` per map, ``module`` being the node name
``torchvision.models.feature_extraction.create_feature_extractor`` knows it by. In
features-only mode (``FeaturesMixin.to_features``) the model drops what its maps do not
need (the classifier, later stages) and ``forward`` returns an ``OrderedDict`` of the
requested maps keyed ``'0'``, ``'1'``, ... in ``out_indices`` order, the keys torchvision's
``BackboneWithFPN`` gives its maps, so ``FeaturePyramidNetwork`` and the detection models'
defaults take the output as it is (``list(out.values())`` is timm's list).
"""
from collections import OrderedDict

import torch.nn as nn


class FeatureInfo(list):
    """The backbone's feature maps (a list of dicts, timm-like) and the selected ``out_indices``.

    The helpers return one value per selected map (``idx`` overrides the selection).
    """

    def __init__(self, entries, out_indices=None):
        super().__init__(entries)
        self.out_indices = tuple(range(len(entries))) if out_indices is None else tuple(out_indices)

    def _pick(self, key, idx):
        return [self[i][key] for i in (self.out_indices if idx is None else idx)]

    def channels(self, idx=None):
        return self._pick("num_chs", idx)

    def reduction(self, idx=None):
        return self._pick("reduction", idx)

    def module_name(self, idx=None):
        return self._pick("module", idx)

    def return_nodes(self, idx=None):
        """``{node name: '0', ...}`` for ``create_feature_extractor`` (same keys as features mode)."""
        return {name: str(k) for k, name in enumerate(self.module_name(idx))}

    def describe(self):
        return ", ".join(f"{e['index']}: {e['module']} ({e['num_chs']} ch, stride {e['reduction']})" for e in self)


def check_out_indices(out_indices, info, backbone):
    """The indices as a tuple; ValueError with one sentence when they cannot select maps of ``info``."""
    if isinstance(out_indices, int) and not isinstance(out_indices, bool):
        out_indices = [out_indices]
    if (not isinstance(out_indices, (list, tuple)) or not out_indices
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in out_indices)):
        raise ValueError(f"out_indices={out_indices!r} must be a non-empty list of feature indices; "
                         f"{backbone} has {info.describe()}")
    bad = [i for i in out_indices if not 0 <= i < len(info)]
    if bad:
        raise ValueError(f"out_indices {bad} out of range; {backbone} has features 0..{len(info) - 1} "
                         f"({info.describe()})")
    if len(set(out_indices)) != len(out_indices):
        raise ValueError(f"out_indices={list(out_indices)} lists a feature twice; list each once")
    if list(out_indices) != sorted(out_indices):
        raise ValueError(f"out_indices={list(out_indices)} must increase (finest map first, as FPNs take them)")
    return tuple(out_indices)


def require_classifier(model_cfg, who):
    """Refuse a features-only model section where ``who`` (the trainer, ./test.sh) needs class scores."""
    from core.fields import ConfigError
    if model_cfg.get("features_only"):
        raise ConfigError(f"model.features_only: true makes the model return feature maps (for detection or "
                          f"segmentation code); {who} needs a classifier: set model.features_only=false")


class FeaturesMixin:
    """Stage outputs of a backbone. The backbone defines ``feature_info`` (a :class:`FeatureInfo`),
    ``_feature_step(i, x)`` (map ``i`` from map ``i - 1``, or from the input for ``i = 0``) and
    ``_after_features(last)`` (the module names that no map up to index ``last`` needs).
    """

    out_indices = None  # features-only mode when set: forward returns these maps

    def forward_stages(self, x, indices=None):
        """``OrderedDict`` of the maps at ``indices`` (default: ``out_indices``, else all), keyed '0', '1', ...

        Python control flow on indices only, so torch.fx traces it as eager runs it.
        """
        if indices is None:
            indices = tuple(range(len(self.feature_info))) if self.out_indices is None else self.out_indices
        elif self.out_indices is not None and max(indices) > max(self.out_indices):
            raise ValueError(f"indices {list(indices)}: this features-only model keeps maps up to "
                             f"{max(self.out_indices)} only")
        out = OrderedDict()
        for i in range(max(indices) + 1):
            x = self._feature_step(i, x)
            if i in indices:
                out[str(len(out))] = x
        return out

    def to_features(self, out_indices=None):
        """Turn this model into its features-only form in place and return it.

        Drops the modules no selected map needs; their checkpoint keys are listed in
        ``dropped_modules`` so ``load_weights`` reports them as unused instead of unexpected.
        """
        name = type(self).__name__
        indices = check_out_indices(list(range(len(self.feature_info))) if out_indices is None else out_indices,
                                    self.feature_info, getattr(self, "arch_name", name))
        dropped = self._after_features(max(indices))
        for module in dropped:
            parent, _, child = module.rpartition(".")
            owner = self.get_submodule(parent) if parent else self
            delattr(owner, child)
        self.dropped_modules = tuple(dropped)
        self.out_indices = indices
        self.feature_info = FeatureInfo(self.feature_info, indices)
        return self


class FPNBackbone(nn.Module):
    """A features-only model plus torchvision's ``FeaturePyramidNetwork``: the backbone torchvision's
    detection models take (``out_channels`` attribute, an OrderedDict of maps out).

    torchvision's own ``BackboneWithFPN`` does the same around ``IntermediateLayerGetter``, which
    calls a model's children in registration order instead of its ``forward``; this runs our forward.
    ``extra_blocks`` defaults to a max-pooled extra level ('pool'), as torchvision's Faster R-CNN uses.
    """

    def __init__(self, body, out_channels=256, extra_blocks=None):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
        if getattr(body, "out_indices", None) is None:
            raise ValueError("FPNBackbone needs a features-only model: build_model(cfg, features_only=True, "
                             "out_indices=[...])")
        self.body, self.out_channels = body, out_channels
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks)

    def forward(self, x):
        return self.fpn(self.body(x))


__all__ = ["FeatureInfo", "FeaturesMixin", "FPNBackbone", "check_out_indices"]
