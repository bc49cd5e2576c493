"""Backbones and ``build_model``: a model is a backbone + a conv type + plug-in blocks.

``build_model({'backbone': 'resnet50', 'num_classes': 1000, 'conv': {'type': 'plain'},
'plugins': [{'type': 'ce', 'position': 'after_norm', 'stages': [1, 2, 3], 'stem': True}]})``
"""
import inspect

import torch

from blocks.conv import EXCLUDE, ConvFactory, conv_option_names
from blocks.registry import check_options, get_block, get_conv
from core.fields import ConfigError
from core.names import did_you_mean

from .cifar_resnet import CifarResNet, build_cifar_resnet
from .features import FeatureInfo
from .finetune import apply_finetune, check_finetune_cfg
from .mobilenetv2 import MobileNetV2, build_mobilenet_v2
from .plugins import SPEC_KEYS, block_options, parse_plugins
from .resnet import ARCHS as RESNET_ARCHS, ResNet, build_resnet
from .shufflenetv2 import WIDTHS as SHUFFLENET_WIDTHS, ShuffleNetV2, build_shufflenet_v2

BACKBONES = {name: (build_resnet, ResNet) for name in RESNET_ARCHS}
BACKBONES["mobilenet_v2"] = (build_mobilenet_v2, MobileNetV2)
BACKBONES.update({name: (build_shufflenet_v2, ShuffleNetV2) for name in SHUFFLENET_WIDTHS})
BACKBONES.update({f"cifar_resnet{d}": (build_cifar_resnet, CifarResNet) for d in (20, 32, 44, 56, 110)})


def _get(cfg, key, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def build_model(model_cfg, features_only=None, out_indices=None):
    """Build the model a ``model`` config section describes (validated first).

    ``features_only`` / ``out_indices`` override the section's keys (``out_indices`` alone implies
    ``features_only=True``); a features-only model returns the maps at ``out_indices`` (an OrderedDict
    '0', '1', ...; see ``models.features``), e.g.
    ``build_model(load_config(path).model, features_only=True, out_indices=[1, 2, 3, 4])``.
    """
    if features_only is not None or out_indices is not None:  # out_indices alone implies features_only
        model_cfg = dict(model_cfg, features_only=True if features_only is None else features_only)
        if out_indices is not None:
            model_cfg["out_indices"] = list(out_indices)
    validate_model_cfg(model_cfg, build=False)
    name = _get(model_cfg, "backbone")
    builder, _ = BACKBONES[name]
    specs = parse_plugins(_get(model_cfg, "plugins", []))
    conv = ConvFactory(_get(model_cfg, "conv", {"type": "plain"}))
    model = builder(name, conv, specs, int(_get(model_cfg, "num_classes", 1000)),
                    **dict(_get(model_cfg, "backbone_args", {}) or {}))
    model.arch_name = name
    if _get(model_cfg, "features_only"):
        built = _plugins_present(model)
        try:
            model.to_features(_get(model_cfg, "out_indices"))
        except ValueError as e:  # bad out_indices (models.features.check_out_indices)
            raise ConfigError(f"model.{e}") from None
        _refuse_dropped_plugins(model, specs, built)
    return apply_finetune(model, int(_get(model_cfg, "frozen_stages", -1)),
                          bool(_get(model_cfg, "norm_eval", False)))


def _plugins_present(model):
    return {id(m._blocklab_plugin) for m in model.modules() if getattr(m, "_blocklab_plugin", False)}


def _refuse_dropped_plugins(model, specs, built):
    """A plug-in placed only where the features-only model was cut off would vanish without a word."""
    kept = _plugins_present(model)
    for i, spec in enumerate(specs):
        if id(spec) in built and id(spec) not in kept:
            where = f"stages {list(spec.stages)}" if spec.stages else "the stages"
            raise ConfigError(f"model.plugins.{i} ({spec.type}) sits only on {where}, which out_indices="
                              f"{list(model.out_indices)} drops, so the features-only model would have none of it; "
                              f"add a later map to model.out_indices or place the block on an earlier stage")


def validate_model_cfg(model_cfg, build=True):
    """Refuse a model section that cannot be built, with one sentence saying why.

    Checks names and options statically, then (``build=True``) builds the model on the
    meta device so value errors (e.g. groups that do not divide channels) surface at load.
    """
    name = _get(model_cfg, "backbone")
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone '{name}'{did_you_mean(name, BACKBONES)}; "
                          f"valid: {', '.join(sorted(BACKBONES))}")
    builder, cls = BACKBONES[name]
    args = dict(_get(model_cfg, "backbone_args", {}) or {})
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "conv", "specs", "num_classes",
                                                                   "block", "layers", "depth", "widths"}
    for key in args:
        if key not in accepted:
            raise ConfigError(f"model.backbone_args.{key}: {name} takes no argument '{key}'"
                              f"{did_you_mean(key, accepted)}; valid: {', '.join(sorted(accepted))}")
    conv_cfg = dict(_get(model_cfg, "conv", {"type": "plain"}) or {})
    conv_type = conv_cfg.get("type", "plain")
    try:
        get_conv(conv_type)
    except KeyError as e:
        raise ConfigError(f"model.conv.type: {e.args[0]}") from None
    conv_opts = conv_option_names(conv_type) | {"type", "exclude"}
    for key in conv_cfg:
        if key not in conv_opts:
            raise ConfigError(f"model.conv.{key}: conv type '{conv_type}' has no option '{key}'"
                              f"{did_you_mean(key, conv_opts)}; valid: {', '.join(sorted(conv_opts))}")
    exclude = conv_cfg.get("exclude", [])
    if not EXCLUDE.accepts(exclude):
        bad = [x for x in exclude if x not in EXCLUDE.choices] if isinstance(exclude, (list, tuple)) else []
        what = f"'{bad[0]}' is not a conv role{did_you_mean(bad[0], EXCLUDE.choices)}" if bad else "must be a list"
        raise ConfigError(f"model.conv.exclude={exclude!r}: {what}; write a list of roles "
                          f"({', '.join(EXCLUDE.choices)}), e.g. model.conv.exclude=[stem]")
    _check_options(get_conv(conv_type), {k: v for k, v in conv_cfg.items() if k not in ("type", "exclude")},
                   "model.conv")
    _validate_plugins(_get(model_cfg, "plugins", []) or [], name, cls)
    check_finetune_cfg(model_cfg, name, cls)
    _validate_features(model_cfg)
    if build:
        try:
            with torch.device("meta"):
                build_model(model_cfg)
        except ConfigError:
            raise
        except (ValueError, TypeError, RuntimeError, AssertionError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"model: {name} cannot be built with this config: {first}") from None


def _validate_features(model_cfg):
    features_only, out_indices = _get(model_cfg, "features_only", False), _get(model_cfg, "out_indices")
    if not isinstance(features_only, bool):
        raise ConfigError(f"model.features_only={features_only!r} must be true or false")
    if out_indices is not None and not features_only:
        raise ConfigError(f"model.out_indices={out_indices!r} selects feature maps, which only a "
                          f"features-only model returns; set model.features_only: true or remove out_indices")
    # their range is the backbone's feature_info: checked when build_model makes the features-only model


def _validate_plugins(plugins, backbone, cls):
    if not isinstance(plugins, (list, tuple)):
        raise ConfigError(f"model.plugins must be a list of mappings, got {type(plugins).__name__}")
    for i, raw in enumerate(plugins):
        where = f"model.plugins.{i}"
        if not isinstance(raw, dict) or "type" not in raw:
            raise ConfigError(f"{where} must be a mapping with a 'type' key, e.g. {{type: ce}}; got {raw!r}")
        try:
            block = get_block(raw["type"])
        except KeyError as e:
            raise ConfigError(f"{where}.type: {e.args[0]}") from None
        position = raw.get("position", block.positions[0])
        if position not in block.positions:
            raise ConfigError(f"{where}.position: block '{block.block_name}' attaches at "
                              f"{' or '.join(block.positions)}, not '{position}'")
        if position not in cls.places:
            raise ConfigError(f"{where}: block '{block.block_name}' needs a '{position}' place, which backbone "
                              f"'{backbone}' does not offer (it offers {', '.join(cls.places)})")
        if not isinstance(raw.get("stem", False), bool):
            raise ConfigError(f"{where}.stem={raw['stem']!r} must be true or false")
        if raw.get("stem") and not block.stem_ok:
            raise ConfigError(f"{where}.stem: block '{block.block_name}' cannot follow the stem norm; remove 'stem'")
        stages = raw.get("stages")
        if stages is not None:
            stages_l = [stages] if isinstance(stages, int) else stages
            if not isinstance(stages_l, (list, tuple)) or not all(isinstance(s, int) for s in stages_l):
                raise ConfigError(f"{where}.stages must be a list of stage numbers, got {stages!r}")
            bad = [s for s in stages_l if not 1 <= s <= cls.num_stages]
            if bad:
                raise ConfigError(f"{where}.stages: {bad} out of range; backbone '{backbone}' has stages "
                                  f"1..{cls.num_stages}")
            if not stages_l and not raw.get("stem"):
                raise ConfigError(f"{where}.stages is empty, so the block would be placed nowhere; list stages "
                                  f"(1..{cls.num_stages}), remove 'stages' for all of them, or remove the entry")
        opts = block_options(parse_plugins([raw])[0])
        for key in raw:
            if key not in SPEC_KEYS and key not in opts:
                valid = sorted(set(opts) | set(SPEC_KEYS))
                raise ConfigError(f"{where}.{key}: block '{block.block_name}' has no option '{key}'"
                                  f"{did_you_mean(key, valid)}; valid: {', '.join(valid)}")
        _check_options(block, {k: v for k, v in raw.items() if k not in SPEC_KEYS}, where)
    _refuse_repeats(parse_plugins(plugins), cls.num_stages)


def _refuse_repeats(specs, num_stages):
    """The same block twice at one place (same position and stage, or both on the stem) is refused:
    stacking two copies is rarely meant (a pasted line). Disjoint stages may differ in options."""
    seen = {}
    for i, spec in enumerate(specs):
        places = {(spec.position, s) for s in (spec.stages if spec.stages is not None else range(1, num_stages + 1))}
        places |= {("stem", 0)} if spec.stem else set()
        for j, other in seen.get(spec.type, []):
            common = sorted(places & other)
            if common:
                where = "the stem" if common[0][0] == "stem" else f"stage {common[0][1]}"
                raise ConfigError(f"model.plugins.{i} repeats block '{spec.type}' of model.plugins.{j} at {where}; "
                                  f"remove one, or give them disjoint 'stages' (and 'stem' on one only)")
        seen.setdefault(spec.type, []).append((i, places))


def _check_options(cls, options, where):
    try:
        check_options(cls, options, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_input_size(model_cfg, input_size):
    """Refuse a plug-in whose options need larger feature maps than its places get at ``input_size``.

    A block class may say the smallest map side its options allow (``min_side(**options)``);
    a place's side is the input side halved (rounding up) once per stride-2 step before it.
    """
    name = _get(model_cfg, "backbone")
    cls = BACKBONES[name][1]
    for i, spec in enumerate(parse_plugins(_get(model_cfg, "plugins", []) or [])):
        need = spec.cls.min_side(**spec.options)
        places = [("its stem", cls.stem_halvings)] if spec.stem else []
        places += [(f"stage {s}", cls.stage_halvings[s - 1]) for s in spec.stages or range(1, cls.num_stages + 1)]
        for where, halvings in places:
            side = input_size
            for _ in range(halvings):
                side = -(-side // 2)
            if side < need:
                raise ConfigError(f"model.plugins.{i}: block '{spec.type}' with these options needs feature maps of "
                                  f"at least {need}x{need}, but {where} of {name} has {side}x{side} at input size "
                                  f"{input_size}; leave that stage out of 'stages', change the options "
                                  f"or raise data.input_size")


__all__ = ["FeatureInfo", "build_model", "validate_model_cfg", "check_input_size", "BACKBONES", "get_conv"]
