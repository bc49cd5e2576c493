"""The conv factory: every conv a backbone makes comes from here.

The config's ``model.conv`` picks the conv type (``{type: plain}`` gives
``nn.Conv2d``; ``{type: we, ...}`` gives weight-excited convs) and which conv
roles keep the plain conv (``exclude``). Roles: ``stem`` (the first conv),
``regular`` (the convs of residual/inverted-residual branches), ``depthwise``
(groups == in_channels == out_channels), ``downsample`` (1x1 projection
shortcuts) and ``head`` (MobileNetV2's final 1x1 conv).
"""
import torch.nn as nn

from .registry import CONV_CALL_ARGS, Option, get_conv, options_of, register_conv

ROLES = ("stem", "regular", "depthwise", "downsample", "head")
EXCLUDE = Option(list, choices=ROLES, doc="conv roles that keep the plain nn.Conv2d, e.g. [stem]")  # every conv type


@register_conv("plain")
class PlainConv2d(nn.Conv2d):
    """``nn.Conv2d`` under the registry's calling convention (state-dict identical)."""

    OPTIONS = {}


class ConvFactory:
    """Builds convs for a backbone from one ``model.conv`` config entry."""

    def __init__(self, conv_cfg=None):
        conv_cfg = dict(conv_cfg or {"type": "plain"})
        self.type = conv_cfg.pop("type", "plain")
        self.exclude = tuple(conv_cfg.pop("exclude", ()))
        self.cls = get_conv(self.type)
        self.options = conv_cfg

    def __call__(self, in_ch, out_ch, kernel_size, stride=1, padding=0, groups=1,
                 bias=False, role="regular"):
        if role not in ROLES:
            raise ValueError(f"unknown conv role '{role}'; valid: {ROLES}")
        if role in self.exclude or self.type == "plain":
            return nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                             groups=groups, bias=bias)
        return self.cls(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                        groups=groups, bias=bias, **self.options)


def conv_option_names(conv_type):
    """Options a conv type accepts in the config (beyond ``type`` and ``exclude``)."""
    return set(options_of(get_conv(conv_type), skip=3)) - CONV_CALL_ARGS
