"""Squeeze-and-Excitation (Hu et al., CVPR 2018, Sec. 3; as used by the ED-Net repository's
``ed_se_resnet.py`` / ``ed_se_resnext.py``).

y = x * sigmoid(W2 relu(W1 avgpool(x))), with W1: C -> C/r and W2: C/r -> C.
Applied in the ``after_norm`` position: to the residual branch after its last norm,
before the shortcut addition.
"""
import torch.nn as nn

from .registry import Block, Option, register_block


@register_block("se", positions=("after_norm",))
class SE(Block):
    """Channel gating from globally pooled features (reduction ``reduction``)."""

    OPTIONS = {"reduction": Option(int, low=1, doc="reduction ratio r: hidden width max(C // r, 1) "
                                   "(16 in the SE paper and ED-Net's SE models)")}

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def extra_repr(self):
        return f"{self.fc1.in_channels}, hidden={self.fc1.out_channels}"

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.relu(self.fc1(s))))
