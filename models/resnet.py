"""ResNet and ResNeXt for ImageNet (He et al. 2016; Xie et al. 2017), torchvision-compatible.

Parameter names and shapes equal torchvision's ``resnet*``/``resnext*`` (stride on
the 3x3 conv, "ResNet v1.5"), so its checkpoints load unchanged. Every conv comes
from the conv factory, and each residual block offers two plug-in places: after
its last norm (CE, SE) and a parallel path from the shortcut output (ED).
"""
import torch.nn as nn

from .backbone import Backbone
from .features import FeatureInfo
from .plugins import attach, attach_stem, branch_width, init_backbone


class ResidualBlock(nn.Module):
    """A residual block with two plug-in places: after the branch's last norm (``after_norm``, applied in
    turn) and beside the branch on the block's input (``parallel``, added). Subclasses define ``branch``
    and ``last_norm``."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.branch(x)
        for name in self.after_norm:
            out = getattr(self, name)(out)
        for name in self.parallel:
            out = out + getattr(self, name)(identity)
        return self.relu(out + identity)

    def zero_init_last(self):
        """Start as the identity: the last norm's scale at 0 (torchvision's ``zero_init_residual``)."""
        nn.init.zeros_(self.last_norm.weight)


class BasicBlock(ResidualBlock):
    expansion = 1

    def __init__(self, conv, inplanes, planes, stride, downsample, specs, stage,
                 groups=1, base_width=64):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        width = branch_width(specs, planes, stage, host="basic")
        self.conv1 = conv(inplanes, width, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(width, planes, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.after_norm = attach(self, specs, stage, planes, "after_norm")
        self.parallel = attach(self, specs, stage, planes, "parallel")

    @property
    def last_norm(self):
        return self.bn2

    def branch(self, x):
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class Bottleneck(ResidualBlock):
    expansion = 4

    def __init__(self, conv, inplanes, planes, stride, downsample, specs, stage,
                 groups=1, base_width=64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        width = branch_width(specs, width, stage, groups)
        out = planes * self.expansion
        self.conv1 = conv(inplanes, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv(width, width, 3, stride=stride, padding=1, groups=groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv(width, out, 1)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.after_norm = attach(self, specs, stage, out, "after_norm")
        self.parallel = attach(self, specs, stage, out, "parallel")

    @property
    def last_norm(self):
        return self.bn3

    def branch(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


def kaiming_init(m):
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ResNet(Backbone):
    """ImageNet ResNet/ResNeXt; any input size (adaptive pooling).

    Features (``feature_info``, timm's numbering): 0 the stem after its activation (64 channels,
    stride 2), 1-4 the outputs of layer1-4 (strides 4, 8, 16, 32).

    ``zero_init_residual`` zeroes the last BN gamma of every residual branch (Goyal et al. 2017);
    ``zero_init_bias`` zeroes every bias, as ED-Net initialises its models (PyTorch's default
    otherwise leaves the fc and SE biases uniform in +-1/sqrt(fan_in)).
    """

    places = ("after_norm", "parallel", "stem")
    num_stages = 4
    stem_halvings, stage_halvings = 1, (2, 3, 4, 5)  # stride-2 steps before each place (map side ~ input / 2^k)

    def __init__(self, block, layers, conv, specs=(), num_classes=1000, groups=1, width_per_group=64,
                 zero_init_residual=False, zero_init_bias=False, in_chans=3):
        super().__init__()
        self.inplanes = 64
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = conv(in_chans, 64, 7, stride=2, padding=3, role="stem")
        self.bn1 = nn.BatchNorm2d(64)
        self.stem_plugins = attach_stem(self, specs, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._make_layer(block, conv, planes, n, stride, specs, i + 1))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.feature_info = FeatureInfo([dict(index=0, module="relu", num_chs=64, reduction=2)] + [
            dict(index=i, module=f"layer{i}", num_chs=c * block.expansion, reduction=2 ** (i + 1))
            for i, c in enumerate((64, 128, 256, 512), start=1)])
        init_backbone(self, kaiming_init)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, ResidualBlock):
                    m.zero_init_last()
        if zero_init_bias:  # ED-Net's init (ed_resnet.py:107-108): every bias 0, the fc's and plug-ins' too
            for name, p in self.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias":
                    nn.init.zeros_(p)

    def _make_layer(self, block, conv, planes, blocks_n, stride, specs, stage):
        downsample = None
        out = planes * block.expansion
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(conv(self.inplanes, out, 1, stride=stride, role="downsample"),
                                       nn.BatchNorm2d(out))
        layers = [block(conv, self.inplanes, planes, stride, downsample, specs, stage,
                        self.groups, self.base_width)]
        self.inplanes = out
        for _ in range(1, blocks_n):
            layers.append(block(conv, out, planes, 1, None, specs, stage, self.groups, self.base_width))
        return nn.Sequential(*layers)

    def _stem(self, x):
        x = self.bn1(self.conv1(x))
        for name in self.stem_plugins:
            x = getattr(self, name)(x)
        return self.relu(x)

    def forward_features(self, x):
        x = self.maxpool(self._stem(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def _feature_step(self, i, x):
        if i == 0:
            return self._stem(x)
        return getattr(self, f"layer{i}")(self.maxpool(x) if i == 1 else x)

    def stem_and_stages(self):
        stem = [self.conv1, self.bn1] + [getattr(self, n) for n in self.stem_plugins]
        return [stem] + [[getattr(self, f"layer{k}")] for k in range(1, self.num_stages + 1)
                         if hasattr(self, f"layer{k}")]  # a features-only model may end early

    def _after_features(self, last):
        return ([] if last else ["maxpool"]) + [f"layer{i}" for i in range(last + 1, 5)] + ["avgpool", "fc"]

    def forward_head(self, x):
        return self.fc(self.avgpool(x).flatten(1))


ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), {}),
    "resnet34": (BasicBlock, (3, 4, 6, 3), {}),
    "resnet50": (Bottleneck, (3, 4, 6, 3), {}),
    "resnet101": (Bottleneck, (3, 4, 23, 3), {}),
    "resnet152": (Bottleneck, (3, 8, 36, 3), {}),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), {"groups": 32, "width_per_group": 4}),
    "resnext101_32x4d": (Bottleneck, (3, 4, 23, 3), {"groups": 32, "width_per_group": 4}),
    "resnext101_32x8d": (Bottleneck, (3, 4, 23, 3), {"groups": 32, "width_per_group": 8}),
}


def build_resnet(name, conv, specs, num_classes, **kwargs):
    block, layers, arch_kwargs = ARCHS[name]
    return ResNet(block, layers, conv, specs, num_classes, **arch_kwargs, **kwargs)
