"""CIFAR ResNets (He et al. 2016, Sec. 4.2): depth 6n+2, three stages of 16/32/64 channels.

Shortcuts follow the paper's option A (identity, zero-padded channels, stride by
subsampling), giving its parameter counts (ResNet-20: 0.27M, ResNet-110: 1.7M);
``shortcut: B`` uses 1x1 projections instead. Blocks reuse the ImageNet
``BasicBlock`` so every plug-in place is offered the same way.
"""
import torch.nn as nn
import torch.nn.functional as F

from .backbone import Backbone
from .features import FeatureInfo
from .plugins import attach_stem, init_backbone
from .resnet import BasicBlock, ResNet, kaiming_init


class PadShortcut(nn.Module):
    """Option A shortcut: subsample spatially and zero-pad the new channels (no parameters)."""

    def __init__(self, stride, extra_channels):
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x):
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class CifarResNet(Backbone):
    """Features: 0 the stem after its activation (16 channels, stride 1), 1-3 layer1-3 (strides 1, 2, 4)."""

    places = ("after_norm", "parallel", "stem")
    num_stages = 3
    stem_halvings, stage_halvings = 0, (0, 1, 2)  # stride-2 steps before each place (map side ~ input / 2^k)
    stem_and_stages = ResNet.stem_and_stages  # the same layout: conv1, bn1, stem plug-ins, layer1..
    _stem = ResNet._stem
    forward_head = ResNet.forward_head

    def __init__(self, depth, conv, specs=(), num_classes=10, shortcut="A", in_chans=3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"CIFAR ResNet shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = conv(in_chans, 16, 3, padding=1, role="stem")
        self.bn1 = nn.BatchNorm2d(16)
        self.stem_plugins = attach_stem(self, specs, 16)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 16
        for i, planes in enumerate((16, 32, 64)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                down = None
                if stride != 1 or inplanes != planes:
                    down = (PadShortcut(stride, planes - inplanes) if shortcut == "A" else
                            nn.Sequential(conv(inplanes, planes, 1, stride=stride, role="downsample"),
                                          nn.BatchNorm2d(planes)))
                layers.append(BasicBlock(conv, inplanes, planes, stride, down, specs, i + 1))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)
        self.feature_info = FeatureInfo([dict(index=0, module="relu", num_chs=16, reduction=1)] + [
            dict(index=i, module=f"layer{i}", num_chs=c, reduction=2 ** (i - 1))
            for i, c in enumerate((16, 32, 64), start=1)])
        init_backbone(self, kaiming_init)

    def forward_features(self, x):
        return self.layer3(self.layer2(self.layer1(self._stem(x))))

    def _feature_step(self, i, x):
        return self._stem(x) if i == 0 else getattr(self, f"layer{i}")(x)

    def _after_features(self, last):
        return [f"layer{i}" for i in range(last + 1, 4)] + ["avgpool", "fc"]



def build_cifar_resnet(name, conv, specs, num_classes, **kwargs):
    return CifarResNet(int(name.rsplit("resnet", 1)[1]), conv, specs, num_classes, **kwargs)
