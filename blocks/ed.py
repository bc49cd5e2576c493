"""ED: the lightweight Encoder-Decoder path of Jin, Xie, Wei, Zhao, Zhang and Tan,
"A Lightweight Encoder-Decoder Path for Deep Residual Networks", as built by
the ED-Net repository's ``ed_resnet.py`` / ``ed_resnext.py`` (``Bottleneck``,
attributes ``encoder`` and ``decoder``).

For the output ``s`` of a bottleneck's shortcut (identity or projection), with
C = ``channels`` and p = C / ``reduction``::

    encoder: e = ReLU(BN(Conv3x3(s; C -> p, stride 2, padding 1, groups, no bias)))
    decoder: d = BN(ConvTranspose3x3(e; p -> C, stride 2, padding 1, groups, no bias))

and the host block returns ``ReLU(branch(x) + s + d)``; the shortcut is
computed once and feeds both the sum and the path. Both convolutions are
initialised as the original does (Kaiming normal, fan-out; its
``init.kaiming_normal(mode='fan_out')`` on every ``conv`` key), the BNs as
weight 1 / bias 0 (the decoder BN is *not* zero-initialised).

Differences from the original, on purpose:
* the decoder's output padding is derived from the input size at run time
  (``decode_to``), so the output always matches the input (any size, odd sizes
  included, also in exported ONNX/TorchScript/torch.export files); the
  original hard-codes ``output_padding=1`` (0 in stage 4), so only 224x224
  inputs work there;
* the original evaluates the shortcut twice; the backbone here computes it once.

p in the original is the host bottleneck's base 3x3 width: ``reduction=4`` for
ED-ResNet (C = 4 x width) and ``reduction=2`` for ED-ResNeXt-32x4d
(C = 2 x width): ED-ResNeXt configs must set ``reduction: 2``.

Efficient variants (README of the repository; not in the released code, so
derived here; the derivation and GFLOPs are in ``docs/ed_variants.md``):
* ``variant='B'`` -- "remove half of the 3x3 convolution filters of the
  transformation branches": the host's mid (3x3) width is halved (conv1 out,
  conv2 in/out, conv3 in); the ED path keeps p = C / reduction. ResNet-50:
  widths 64/128/256/512 -> 32/64/128/256; ResNeXt-50: 128/256/512/1024 ->
  64/128/256/512.
* ``variant='A'`` -- "remove a portion of channels of the transform branches
  to make ED-Net have the same/comparable FLOPs as that of the baseline": in
  every stage the mid width becomes the one at which a block's branch *plus its
  ED path* costs what the plain branch costs, counted as the README counts
  (``tools.flops`` convention ``ednet``), rounded to the nearest multiple of 8
  (ResNet, ungrouped 3x3) or of the cardinality 32 (ResNeXt-32x4d). ResNet:
  64/128/256/512 -> 56/120/240/480; ResNeXt-32x4d: 128/256/512/1024 ->
  96/224/416/864. The host is read from ``reduction`` (4: ResNet bottleneck,
  2: ResNeXt-32x4d, the pairs of the original); other reductions are refused.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fusion import fold_bn
from .registry import Block, Option, log_adjustment, register_block

VARIANTS = (None, "A", "B")
DEFAULT_GROUPS = 32  # the original's groups of both convs


def _ed_model(backbone, variant):
    reduction = 2 if backbone.startswith("resnext") else 4   # p = the 3x3 width, as in the original
    return {"backbone": backbone, "plugins": [{"type": "ed", "position": "parallel",
                                               "reduction": reduction, "variant": variant}]}


# The README's GFLOPs table ("efficient ED-Nets"), in its own counting (``tools.flops``
# convention ``ednet``), for ``python -m tools.flops --table``. The full ED models have no
# README figure (None) and are listed for reference.
README_GFLOPS = {   # backbone: (plain, full ED, -A, -B)
    "resnet50": (4.1, None, 4.0, 2.1),
    "resnet101": (7.9, None, 7.8, 3.9),
    "resnet152": (11.7, None, 11.5, 5.6),
    "resnext50_32x4d": (4.2, None, 4.2, 2.9),
    "resnext101_32x4d": (8.0, None, 7.9, 5.4),
}


def _published_rows():
    """name: (model section, input size, published params (M), published GFLOPs, source)."""
    rows = {}
    for backbone, figures in README_GFLOPS.items():
        for variant, gflops in zip(("plain", None, "A", "B"), figures):
            name = {"plain": backbone, None: f"ed_{backbone}"}.get(variant, f"ed_{backbone}-{variant}")
            model = {"backbone": backbone} if variant == "plain" else _ed_model(backbone, variant)
            rows[name] = (model, 224, None, gflops, "ED-Net README")
    return rows


PUBLISHED_GFLOPS = _published_rows()

# -A hosts, keyed by the ED ``reduction`` the original pairs them with (p = the host's 3x3 width):
# reduction: (C / 3x3 width, cardinality of the host's 3x3 conv, rounding unit of the -A width)
A_HOSTS = {4: (4, 1, 8),      # ED-ResNet: bottleneck C = 4 w, ungrouped 3x3
           2: (2, 32, 32)}    # ED-ResNeXt-32x4d: C = 2 w, 32-group 3x3


def a_costs(width, reduction=4, groups=DEFAULT_GROUPS):
    """(branch(w) -> cost, ED path cost) per output pixel of a repeated bottleneck of 3x3 width
    ``width`` on the -A host of ``reduction``, in the ED README's counting (see ``a_width``)."""
    if reduction not in A_HOSTS:
        raise ValueError(f"ed variant A: no -A rule for reduction={reduction}; it is defined for the "
                         f"ED-Net hosts: reduction=4 (ResNet bottleneck) or 2 (ResNeXt-32x4d)")
    ratio, cardinality, _unit = A_HOSTS[reduction]
    channels, hidden = ratio * width, width

    def branch(w):
        return 2 * channels * w + 9 * w * w / cardinality + 4 * (2 * w + channels)

    ed = 9 * channels * hidden / (4 * groups) + 9 * channels * hidden / groups + hidden + 4 * channels
    return branch, ed


def a_width(width, reduction=4, groups=DEFAULT_GROUPS):
    """Real-valued -A mid width: a repeated block's branch + ED path cost what its plain branch did.

    Costs per output pixel in the ED README's counting (``tools.flops`` convention ``ednet``:
    a conv or transposed conv costs C_in/groups*k*k per output element, a BatchNorm 4 per
    element), for a bottleneck with output C, 3x3 width w and host cardinality G:
        branch(w) = 2 C w + 9 w^2 / G + 4 (2 w + C)       conv1 + conv3, conv2, bn1..bn3
        ed        = 9 C p / (4 g) + 9 C p / g + p + 4 C    encoder (1/4 area), decoder, BNs
    with p = C / reduction (the plain 3x3 width) and g the ED groups;
    -A solves branch(w') = branch(w) - ed for w'.
    """
    branch, ed = a_costs(width, reduction, groups)
    channels, cardinality = A_HOSTS[reduction][0] * width, A_HOSTS[reduction][1]
    a, b, c = 9 / cardinality, 2 * channels + 8, 4 * channels - (branch(width) - ed)
    if c >= 0:
        raise ValueError(f"ed variant A: the ED path (groups={groups}) costs more than a branch of width "
                         f"{width} can give up; no -A width matches the baseline's FLOPs")
    return (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


def crop_to(y, x):
    """``y`` cut to ``x``'s height and width (its top-left part), as a slice that traces symbolically."""
    return y[:, :, :x.shape[-2], :x.shape[-1]]


def decode_to(conv, e, x):
    """Transposed conv ``conv`` of ``e`` sized back to ``x``'s height and width.

    Eager (and torch.compile): ``output_size=`` picks the output padding, 0 for an odd side and 1
    for an even one. Traced or exported, that padding would be fixed at the traced size (TorchScript
    and legacy ONNX files made at one size failed at sizes of the other parity) or not convertible
    (the dynamo ONNX exporter); there the decoder runs on ``e`` padded by one zero row and column at
    the bottom/right (2 * ceil(s / 2) + 1 > s rows for a side s; a zero input row adds nothing to
    the rows kept) and is cropped to s by a slice recorded on x's shape. Both give the same values
    (up to float summation order); eager does not pay for the padded row, and FLOP counts see the
    transposed conv at x's size.
    """
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return crop_to(conv(F.pad(e, (0, 1, 0, 1))), x)
    return conv(e, output_size=x.shape[-2:])


@register_block("ed", positions=("parallel",))
class ED(Block):
    """Encoder-decoder path: stride-2 grouped 3x3 conv C->p + BN + ReLU, then a
    stride-2 grouped 3x3 transposed conv p->C + BN sized back to the input.

    channels: C, the host block's output (= shortcut) channels.
    groups: groups of both convs; None (default): 32 as in the original, or where 32 does not divide
    C and p (small hosts: basic blocks, CIFAR ResNets) the largest divisor of both below 32, logged.
    reduction: p = C // reduction (4 for ED-ResNet, 2 for ED-ResNeXt-32x4d as in the original).
    variant: None, 'A' or 'B'; changes only the host's branch width (see ``branch_width``).
    """

    OPTIONS = {
        "groups": Option(int, low=1, nullable=True, doc="groups of the encoder and decoder convs; null: 32 (the "
                         "original's) where it divides C and p, else the largest divisor of both below 32 "
                         "(logged); a given value must divide C and p"),
        "reduction": Option(int, low=1, doc="p = C // reduction, the path's hidden width (4 for ED-ResNet, "
                            "2 for ED-ResNeXt-32x4d: p = the plain 3x3 width)"),
        "variant": Option(str, choices=VARIANTS, doc="efficient ED-Nets of the ED-Net README: 'A' narrows the "
                          "host's 3x3 width to the baseline's FLOPs, 'B' halves it (docs/ed_variants.md); "
                          "bottleneck hosts only"),
    }

    def __init__(self, channels, groups=None, reduction=4, variant=None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"ed: unknown variant {variant!r}; valid: None, 'A', 'B'")
        if reduction < 1 or channels % reduction:
            raise ValueError(f"ed: reduction={reduction} must divide channels={channels}")
        hidden = channels // reduction
        groups = self.resolve_groups(channels, hidden, groups)
        self.channels, self.hidden, self.groups = channels, hidden, groups
        self.encoder_conv = nn.Conv2d(channels, hidden, 3, stride=2, padding=1, groups=groups, bias=False)
        self.encoder_bn = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.decoder_conv = nn.ConvTranspose2d(hidden, channels, 3, stride=2, padding=1,
                                               groups=groups, bias=False)
        self.decoder_bn = nn.BatchNorm2d(channels)
        for conv in (self.encoder_conv, self.decoder_conv):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def resolve_groups(channels, hidden, groups):
        """The groups used for C = ``channels``, p = ``hidden``: ``groups``, or for None 32 / the largest
        divisor of both below it (logged); a given value that does not divide both is refused with the fix."""
        common = math.gcd(channels, hidden)
        best = max(k for k in range(1, min(DEFAULT_GROUPS, common) + 1) if common % k == 0)
        if groups is None:
            if best != DEFAULT_GROUPS:
                log_adjustment(f"ed: groups {DEFAULT_GROUPS} (the original's) does not divide channels={channels} "
                               f"and channels // reduction = {hidden}; using groups={best} there")
            return best
        if channels % groups or hidden % groups:
            raise ValueError(f"ed: groups={groups} must divide channels={channels} and channels // reduction = "
                             f"{hidden}; set groups: {best} (or leave groups unset to adjust it per stage)")
        return groups

    def forward(self, x):
        e = self.relu(self.encoder_bn(self.encoder_conv(x)))
        return self.decoder_bn(decode_to(self.decoder_conv, e, x))

    @classmethod
    def branch_width(cls, width, stage, groups=None, reduction=4, variant=None, host="bottleneck"):
        """Mid (3x3) width of the host block for ``variant`` (None: unchanged).

        'B' halves it. 'A' takes ``a_width`` (where branch + ED path cost what the plain branch
        did, in the ED README's counting) to the nearest multiple of 8 (ResNet) or 32
        (ResNeXt-32x4d), never below that unit nor above ``width``. Both are defined for
        bottleneck hosts (``host``), as the ED-Net README's models are; a basic block is refused.
        """
        if variant is None:
            return width
        if host != "bottleneck":
            raise ValueError(f"ed variant {variant} is defined for bottleneck hosts (resnet50/101/152, resnext*), "
                             f"not this backbone's {host} blocks; remove 'variant' (docs/ed_variants.md)")
        if variant == "B":
            if width % 2:
                raise ValueError(f"ed variant B: branch width {width} is odd and cannot be halved")
            return width // 2
        if variant == "A":
            unit = A_HOSTS[reduction][2] if reduction in A_HOSTS else 1
            target = a_width(width, reduction, DEFAULT_GROUPS if groups is None else groups)
            return min(width, max(unit, int(target / unit + 0.5) * unit))
        raise ValueError(f"ed: unknown variant {variant!r}; valid: None, 'A', 'B'")

    def extra_repr(self):
        return f"channels={self.channels}, hidden={self.hidden}, groups={self.groups}"

    def deploy(self):
        """Inference form: both BNs folded into their convs (:class:`EDInference`)."""
        return EDInference(self)


class EDInference(nn.Module):
    """ED in eval (``ED.deploy()``): encoder conv+BN and decoder transposed conv+BN folded.

    The decoder's folded bias is added after the transposed conv, not passed to it: on CPU a
    grouped transposed conv with a bias runs a slower kernel (ED-ResNet-50 at 224 px, 1 thread:
    the folded model took 1.5x the eager one's time with the bias inside).
    """

    def __init__(self, ed):
        super().__init__()
        self.encoder_conv = fold_bn(ed.encoder_conv, ed.encoder_bn)
        self.decoder_conv = fold_bn(ed.decoder_conv, ed.decoder_bn)
        self.register_buffer("decoder_bias", self.decoder_conv.bias.detach().clone().view(1, -1, 1, 1))
        self.decoder_conv.bias = None

    def forward(self, x):
        # BN is per channel, so folded into the decoder it commutes with decode_to's crop
        return decode_to(self.decoder_conv, F.relu(self.encoder_conv(x)), x) + self.decoder_bias
