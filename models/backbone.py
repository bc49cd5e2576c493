"""What every blocklab backbone shares: features then head, the stages' maps, the classifier.

A backbone defines ``forward_features`` (the last feature map), ``forward_head`` (pool and classify)
and ``_feature_step`` (one stage at a time, for ``features_only`` maps); ``head_prefix`` names the
classifier's keys (re-initialised when fine-tuning to another class count). Fine-tuning
(``FinetuneMixin``) and feature extraction (``FeaturesMixin``) come with it.
"""
import torch.nn as nn

from .features import FeaturesMixin
from .finetune import FinetuneMixin


class Backbone(FinetuneMixin, FeaturesMixin, nn.Module):
    head_prefix = "fc."

    def forward(self, x):
        if self.out_indices is not None:
            return self.forward_stages(x)
        return self.forward_head(self.forward_features(x))

    def forward_head(self, x):
        raise NotImplementedError

    def get_classifier(self):
        """The classifier module (the last Linear), as timm's ``get_classifier``."""
        return self.get_submodule(self.head_prefix.rstrip("."))
