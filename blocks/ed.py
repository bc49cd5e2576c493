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
* the decoder's output padding is derived from the input size at run time, so
  the output always matches the input (any size, odd sizes included); the
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
* ``variant='A'`` -- "remove a portion of channels of the transform branches"
  to bring the FLOPs back to the baseline's: the mid width is cut by 1/16 and
  rounded to a multiple of 32 (the ResNeXt cardinality and the ED groups),
  the rounding of torchvision's ``_make_divisible``. ResNet: 64/128/256/512 ->
  64/128/256/480; ResNeXt-32x4d: 128/256/512/1024 -> 128/256/480/960.
"""
import torch.nn as nn

from .registry import register_block

VARIANTS = (None, "A", "B")


def _ed_model(backbone, variant):
    reduction = 2 if backbone.startswith("resnext") else 4   # p = the 3x3 width, as in the original
    return {"backbone": backbone, "plugins": [{"type": "ed", "position": "parallel",
                                               "reduction": reduction, "variant": variant}]}


# The README's "efficient ED-Nets" table, for ``python -m tools.flops --table``:
# name: (model section, input size, published params (M), published GFLOPs, source)
PUBLISHED_GFLOPS = {
    f"ed_{bb}-{v}": (_ed_model(bb, v), 224, None, g, "ED-Net README")
    for bb, gflops in (("resnet50", (4.0, 2.1)), ("resnet101", (7.8, 3.9)), ("resnet152", (11.5, 5.6)),
                       ("resnext50_32x4d", (4.2, 2.9)), ("resnext101_32x4d", (7.9, 5.4)))
    for v, g in zip("AB", gflops)
}


def _make_divisible(value, divisor):
    """Nearest multiple of ``divisor`` (ties up), never below 90% of ``value`` nor below ``divisor``."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


@register_block("ed", positions=("parallel",))
class ED(nn.Module):
    """Encoder-decoder path: stride-2 grouped 3x3 conv C->p + BN + ReLU, then a
    stride-2 grouped 3x3 transposed conv p->C + BN sized back to the input.

    channels: C, the host block's output (= shortcut) channels.
    groups: groups of both convs (32 in the original).
    reduction: p = C // reduction (4 for ED-ResNet, 2 for ED-ResNeXt-32x4d as in the original).
    variant: None, 'A' or 'B'; changes only the host's branch width (see ``branch_width``).
    """

    def __init__(self, channels, groups=32, reduction=4, variant=None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"ed: unknown variant {variant!r}; valid: None, 'A', 'B'")
        if reduction < 1 or channels % reduction:
            raise ValueError(f"ed: reduction={reduction} must divide channels={channels}")
        hidden = channels // reduction
        if channels % groups or hidden % groups:
            raise ValueError(f"ed: groups={groups} must divide channels={channels} and "
                             f"channels // reduction = {hidden}; set a smaller 'groups'")
        self.channels, self.hidden, self.groups = channels, hidden, groups
        self.encoder_conv = nn.Conv2d(channels, hidden, 3, stride=2, padding=1, groups=groups, bias=False)
        self.encoder_bn = nn.BatchNorm2d(hidden)
        self.relu = nn.ReLU(inplace=True)
        self.decoder_conv = nn.ConvTranspose2d(hidden, channels, 3, stride=2, padding=1,
                                               groups=groups, bias=False)
        self.decoder_bn = nn.BatchNorm2d(channels)
        for conv in (self.encoder_conv, self.decoder_conv):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        e = self.relu(self.encoder_bn(self.encoder_conv(x)))
        # output_size picks the output padding (0 or 1 per side) that restores x's size
        return self.decoder_bn(self.decoder_conv(e, output_size=x.shape[-2:]))

    @classmethod
    def branch_width(cls, width, stage, groups=32, reduction=4, variant=None):
        """Mid (3x3) width of the host bottleneck for ``variant`` (None: unchanged).

        'B' halves it; 'A' removes 1/16 and rounds to a multiple of 32 (of ``width``'s
        largest power-of-two divisor up to 32, for narrow hosts).
        """
        if variant is None:
            return width
        if variant == "B":
            if width % 2:
                raise ValueError(f"ed variant B: branch width {width} is odd and cannot be halved")
            return width // 2
        if variant == "A":
            unit = 32
            while width % unit:
                unit //= 2
            return _make_divisible(width * 15 / 16, unit)
        raise ValueError(f"ed: unknown variant {variant!r}; valid: None, 'A', 'B'")

    def extra_repr(self):
        return f"channels={self.channels}, hidden={self.hidden}, groups={self.groups}"
