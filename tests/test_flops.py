"""tools.flops: the two counting conventions against hand-computed counts and torchvision's figures."""
import pytest
import torch
import torch.nn as nn

from analysis.flops import complexity, ednet_count
from models import build_model


def tiny():
    """conv s2 -> transposed conv s2 -> BN -> ReLU -> max pool -> BN (no affine) -> avg pool -> linear."""
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False),          # 4x8x8 -> 8x4x4
        nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1,       # 8x4x4 -> 4x8x8
                           groups=2, bias=False),
        nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),                           # -> 4x4x4
        nn.BatchNorm2d(4, affine=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # -> 4
        nn.Linear(4, 10))


# per output element, C_in / groups * k * k (thop's rule), one image
CONV = (8 * 4 * 4) * (4 // 2) * 9             # 2304: a convolution's true MACs
CONVT_EDNET = (4 * 8 * 8) * (8 // 2) * 9      # 9216: charged per *output* pixel
CONVT_MACS = (8 * 4 * 4) * (4 // 2) * 9       # 2304: true MACs, per *input* pixel: 1/4 of the above
BN_AFFINE = 4 * (4 * 8 * 8)                    # 1024: 2 per element, x2 for the affine transform
BN_PLAIN = 2 * (4 * 4 * 4)                     # 128
AVGPOOL = (16 + 1) * 4                         # 68: (area ratio + 1) per output element
LINEAR = 4 * 10                                # 40


def test_ednet_counts_by_hand():
    model = tiny().eval()
    x = torch.zeros(1, 4, 8, 8)
    assert ednet_count(model, x) == CONV + CONVT_EDNET + BN_AFFINE + BN_PLAIN + AVGPOOL + LINEAR
    _, gflops = complexity(model, 8, in_chans=4, convention="ednet")
    assert gflops * 1e9 == pytest.approx(CONV + CONVT_EDNET + BN_AFFINE + BN_PLAIN + AVGPOOL + LINEAR)


def test_macs_counts_by_hand():
    _, gmacs = complexity(tiny(), 8, in_chans=4)          # default convention: true MACs
    assert gmacs * 1e9 == pytest.approx(CONV + CONVT_MACS + LINEAR)
    _, same = complexity(tiny(), 8, in_chans=4, convention="macs")
    assert same == gmacs


def test_ednet_rules():
    class Twice(nn.Module):   # a module run twice counts twice; functional ops are free
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1, bias=True)      # bias not counted (thop)

        def forward(self, x):
            return torch.matmul(self.conv(self.conv(x[:, :2]).repeat(1, 1, 1, 1)[:, :2]), torch.ones(5, 5))

    assert ednet_count(Twice(), torch.zeros(1, 2, 5, 5)) == 2 * (3 * 25) * 2

    class ConvWithInner(nn.Conv2d):   # a counted module is not searched further
        def __init__(self):
            super().__init__(2, 2, 1, bias=False)
            self.inner = nn.Linear(2, 2)

        def forward(self, x):
            return super().forward(x) + self.inner(x.mean((2, 3)))[:, :, None, None]

    assert ednet_count(ConvWithInner(), torch.zeros(1, 2, 3, 3)) == 2 * 9 * 2


def test_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="convention"):
        complexity(tiny(), 8, in_chans=4, convention="thop")


@pytest.mark.parametrize("backbone,published", [("resnet50", 4.089), ("mobilenet_v2", 0.301)])
def test_macs_match_torchvision(backbone, published):
    """torchvision's ``_ops`` (GFLOPs = MACs) of ResNet50_Weights / MobileNet_V2_Weights IMAGENET1K_V1."""
    with torch.device("meta"):
        model = build_model({"backbone": backbone, "num_classes": 1000})
    _, gmacs = complexity(model, 224)
    assert gmacs == pytest.approx(published, rel=0.01)
