"""MobileNetV2 (Sandler et al., CVPR 2018), torchvision-compatible names and shapes.

Channels scale with ``width_mult`` and are rounded to multiples of 8 as in
torchvision, whose checkpoints load unchanged. Stage k (1..7) is the k-th row
of the paper's Table 2. The after-norm place of every inverted-residual block
is its final (projection) norm, before the residual addition when there is one;
the stem place follows the first norm. MobileNetV2 offers no parallel place:
its shortcuts are linear bottlenecks present only in some blocks.
"""
import torch.nn as nn

from .backbone import Backbone
from .features import FeatureInfo
from .plugins import attach, attach_stem, init_backbone

# t (expansion), c (channels), n (repeats), s (first stride), paper Table 2
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(v, divisor=8, min_value=None):
    """Round ``v`` to the nearest multiple of ``divisor``, never going 10% below ``v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvNormAct(nn.Sequential):
    """conv -> BN -> ReLU6 (children '0', '1', '2'); stem plug-ins run between norm and activation.

    ``act`` is the activation's class (ShuffleNetV2 uses the same layout with ReLU)."""

    def __init__(self, conv, in_ch, out_ch, kernel_size=3, stride=1, groups=1, role="regular", act=nn.ReLU6):
        super().__init__(conv(in_ch, out_ch, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
                              groups=groups, role=role),
                         nn.BatchNorm2d(out_ch), act(inplace=True))
        self.plugins = []

    def forward(self, x):
        x = self[1](self[0](x))
        for name in self.plugins:
            x = getattr(self, name)(x)
        return self[2](x)


class InvertedResidual(nn.Module):
    def __init__(self, conv, inp, oup, stride, expand_ratio, specs, stage):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [ConvNormAct(conv, inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [ConvNormAct(conv, hidden, hidden, 3, stride, groups=hidden, role="depthwise"),
                   conv(hidden, oup, 1), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self.after_norm = attach(self, specs, stage, oup, "after_norm")

    def forward(self, x):
        out = self.conv(x)
        for name in self.after_norm:
            out = getattr(self, name)(out)
        return x + out if self.use_res_connect else out


def mbv2_init(m):
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.zeros_(m.bias)


class MobileNetV2(Backbone):
    """Features as timm numbers them: the last block before each stride-2 stage and the last block
    (``features.1/3/6/13/17``: 16, 24, 32, 96, 320 channels at width 1, strides 2, 4, 8, 16, 32);
    the 1280-channel head conv is part of the classifier here.
    """

    places = ("after_norm", "stem")
    num_stages = len(SETTINGS)
    head_prefix = "classifier.1."  # the classifier's keys: re-initialised for another class count
    stem_halvings = 1  # stride-2 steps before each place (map side ~ input / 2^k)
    stage_halvings = tuple(1 + sum(s == 2 for *_, s in SETTINGS[:i + 1]) for i in range(len(SETTINGS)))

    def __init__(self, conv, specs=(), num_classes=1000, width_mult=1.0, dropout=0.2, in_chans=3):
        super().__init__()
        inp = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        stem = ConvNormAct(conv, in_chans, inp, 3, stride=2, role="stem")
        stem.plugins = attach_stem(stem, specs, inp)
        features, ends, reduction = [stem], [], 2  # ends: (index in features, channels, stride) of each map
        for stage, (t, c, n, s) in enumerate(SETTINGS, start=1):
            oup = make_divisible(c * width_mult)
            if s == 2:
                ends.append((len(features) - 1, inp, reduction))
                reduction *= 2
            for i in range(n):
                features.append(InvertedResidual(conv, inp, oup, s if i == 0 else 1, t, specs, stage))
                inp = oup
        ends.append((len(features) - 1, inp, reduction))
        features.append(ConvNormAct(conv, inp, self.last_channel, 1, role="head"))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        self.feature_info = FeatureInfo([dict(index=k, module=f"features.{j}", num_chs=ch, reduction=r)
                                         for k, (j, ch, r) in enumerate(ends)])
        self._feature_ends = [j for j, _, _ in ends]
        init_backbone(self, mbv2_init)

    def forward_features(self, x):
        return self.features(x)

    def _feature_step(self, i, x):
        for j in range(self._feature_ends[i - 1] + 1 if i else 0, self._feature_ends[i] + 1):
            x = self.features[j](x)
        return x

    def stem_and_stages(self):
        parts, start = [[self.features[0]]], 1
        for *_, n, _ in SETTINGS:
            parts.append(list(self.features[start:start + n]))
            start += n
        return parts

    def _after_features(self, last):
        return [f"features.{j}" for j in range(self._feature_ends[last] + 1, len(self.features))] + \
            ["avgpool", "classifier"]

    def forward_head(self, x):
        return self.classifier(self.avgpool(x).flatten(1))


def build_mobilenet_v2(name, conv, specs, num_classes, **kwargs):
    return MobileNetV2(conv, specs, num_classes, **kwargs)
