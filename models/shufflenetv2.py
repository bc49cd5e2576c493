"""ShuffleNetV2 (Ma et al., ECCV 2018), torchvision-compatible names and shapes.

Parameter names and shapes equal torchvision's ``shufflenet_v2_x*`` (``conv1``,
``stage2-4``, ``conv5``, ``fc``; each unit's ``branch1``/``branch2`` Sequentials keep
torchvision's indices), so its checkpoints load unchanged; the init is PyTorch's
default, as torchvision's. Stage k (1..3) is the paper's Stage k+1 (module
``stage{k+1}``). Every conv comes from the conv factory (roles: ``stem``, ``regular``
for the 1x1 convs, ``depthwise``, ``head`` for ``conv5``).

The after-norm place of every unit is the last norm of its main branch (``branch2.6``),
before that branch's ReLU, the concatenation with the other half and the channel
shuffle: the unit's counterpart of a residual branch before the addition, where CENet
puts CE in ResNets (docs/shufflenetv2.md says why; CENet released no ShuffleNet code).
The stem place follows ``conv1``'s norm. There is no parallel place (ED): a
stride-1 unit has no shortcut to add a path to, its other half is concatenated.
"""
import torch
import torch.nn as nn

from .backbone import Backbone
from .features import FeatureInfo
from .mobilenetv2 import ConvNormAct
from .plugins import attach, attach_stem

REPEATS = (4, 8, 4)  # units per stage, paper Table 5
WIDTHS = {  # conv1, stage 1-3 outputs, conv5 channels (paper Table 5, torchvision)
    "shufflenet_v2_x0_5": (24, 48, 96, 192, 1024),
    "shufflenet_v2_x1_0": (24, 116, 232, 464, 1024),
    "shufflenet_v2_x1_5": (24, 176, 352, 704, 1024),
    "shufflenet_v2_x2_0": (24, 244, 488, 976, 2048),
}


def channel_shuffle(x, groups=2):
    """Interleave the channels of ``groups`` equal groups (Zhang et al. 2018, ShuffleNet Sec. 3.1)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _depthwise(conv, ch, stride):
    return conv(ch, ch, 3, stride=stride, padding=1, groups=ch, role="depthwise")


class ShuffleUnit(nn.Module):
    """Fig. 3(c) (stride 1: split, branch on one half, concat, shuffle) and 3(d) (stride 2: both branches)."""

    def __init__(self, conv, inp, oup, stride, specs, stage):
        super().__init__()
        mid = oup // 2
        if stride == 1 and inp != 2 * mid:
            raise ValueError(f"a stride-1 ShuffleNetV2 unit needs inp == oup (even), got {inp} -> {oup}")
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(_depthwise(conv, inp, stride), nn.BatchNorm2d(inp), conv(inp, mid, 1),
                                         nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(conv(inp if stride > 1 else mid, mid, 1), nn.BatchNorm2d(mid),
                                     nn.ReLU(inplace=True), _depthwise(conv, mid, stride), nn.BatchNorm2d(mid),
                                     conv(mid, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.out_channels = oup
        self.after_norm = attach(self, specs, stage, mid, "after_norm")

    def main_branch(self, x):
        """branch2 with the after-norm plug-ins between its last norm (index 6) and its ReLU (index 7)."""
        for layer in self.branch2[:7]:
            x = layer(x)
        for name in self.after_norm:
            x = getattr(self, name)(x)
        return self.branch2[7](x)

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.main_branch(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.main_branch(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(Backbone):
    """Features: 0 ``conv1`` (24 channels, stride 2), 1-3 the outputs of ``stage2-4`` (strides 8, 16, 32);
    ``conv5`` (the 1x1 head conv) is part of the classifier here, as MobileNetV2's last conv.
    """

    places = ("after_norm", "stem")
    num_stages = len(REPEATS)
    stem_halvings, stage_halvings = 1, (3, 4, 5)  # stride-2 steps before each place (map side ~ input / 2^k)

    def __init__(self, conv, specs=(), num_classes=1000, widths=WIDTHS["shufflenet_v2_x1_0"], in_chans=3):
        super().__init__()
        self.conv1 = ConvNormAct(conv, in_chans, widths[0], 3, stride=2, role="stem", act=nn.ReLU)
        self.conv1.plugins = attach_stem(self.conv1, specs, widths[0])
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inp = widths[0]
        for stage, (n, oup) in enumerate(zip(REPEATS, widths[1:4]), start=1):
            units = [ShuffleUnit(conv, inp if i == 0 else oup, oup, 2 if i == 0 else 1, specs, stage)
                     for i in range(n)]
            setattr(self, f"stage{stage + 1}", nn.Sequential(*units))
            inp = oup
        self.conv5 = ConvNormAct(conv, inp, widths[4], 1, role="head", act=nn.ReLU)
        self.fc = nn.Linear(widths[4], num_classes)
        self.feature_info = FeatureInfo([dict(index=0, module="conv1", num_chs=widths[0], reduction=2)] + [
            dict(index=k, module=f"stage{k + 1}", num_chs=c, reduction=2 ** (k + 2))
            for k, c in enumerate(widths[1:4], start=1)])

    def _feature_step(self, i, x):
        if i == 0:
            return self.conv1(x)
        return getattr(self, f"stage{i + 1}")(self.maxpool(x) if i == 1 else x)

    def forward_features(self, x):
        return self.conv5(self.stage4(self.stage3(self.stage2(self.maxpool(self.conv1(x))))))

    def stem_and_stages(self):
        return [[self.conv1]] + [[getattr(self, f"stage{k + 1}")] for k in range(1, self.num_stages + 1)
                                 if hasattr(self, f"stage{k + 1}")]  # a features-only model may end early

    def _after_features(self, last):
        return ([] if last else ["maxpool"]) + [f"stage{k + 1}" for k in range(last + 1, 4)] + ["conv5", "fc"]

    def forward_head(self, x):
        return self.fc(x.mean((2, 3)))


def build_shufflenet_v2(name, conv, specs, num_classes, **kwargs):
    return ShuffleNetV2(conv, specs, num_classes, widths=WIDTHS[name], **kwargs)
