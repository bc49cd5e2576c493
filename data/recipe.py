"""Presets: turn the ``data:`` section into one concrete recipe (sizes, mean/std, augmentation).

Seed recipes:
- imagenet: torchvision's reference and both original repositories (CENet
  ``imagenet/train_imagenet.py``, ED-Net ``imagenet_train.py``): RandomResizedCrop(224,
  scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip; eval Resize(256) + CenterCrop(224).
- cenet: imagenet + CENet's ``ColorAugmentation`` (PCA lighting, std 0.1) after ToTensor.
- cifar: 4-pixel zero padding + random 32x32 crop + flip.
- digits: small shifts (padding input_size // 8), no flip (digits are not flip-invariant).
"""
from dataclasses import dataclass
from typing import Optional, Tuple

from core.fields import ConfigError

from .schema import resolve

# mean, std of the training images in [0, 1], RGB
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "digits": ((0.3053, 0.3053, 0.3053), (0.3759, 0.3759, 0.3759)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}

AUGMENT = {
    "imagenet": dict(crop="random_resized", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), padding=0, hflip=0.5,
                     color_jitter=0.0, lighting=0.0, lighting_layout="alexnet"),
    "cenet": dict(crop="random_resized", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), padding=0, hflip=0.5,
                  color_jitter=0.0, lighting=0.1, lighting_layout="cenet"),
    "cifar": dict(crop="pad", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), padding=4, hflip=0.5,
                  color_jitter=0.0, lighting=0.0, lighting_layout="alexnet"),
    "digits": dict(crop="pad", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), padding=None, hflip=0.0,
                   color_jitter=0.0, lighting=0.0, lighting_layout="alexnet"),
    "detection": dict(crop="none", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), padding=0, hflip=0.5,
                      color_jitter=0.0, lighting=0.0, lighting_layout="alexnet"),
    "none": dict(crop="none", scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), padding=0, hflip=0.0,
                 color_jitter=0.0, lighting=0.0, lighting_layout="alexnet"),
}

_FAMILY = {"imagenet_folder": "imagenet", "imagenet_list": "imagenet", "cifar10": "cifar10",
           "cifar100": "cifar100", "digits": "digits", "synthetic": "synthetic", "coco": "coco"}
_DEFAULTS = {  # family -> (input_size, normalize preset, augment preset)
    "imagenet": (224, "imagenet", "imagenet"),
    "cifar10": (32, "cifar10", "cifar"),
    "cifar100": (32, "cifar100", "cifar"),
    "digits": (32, "digits", "digits"),
    "synthetic": (224, "half", "none"),
    "coco": (800, "imagenet", "detection"),  # input_size: the detector's shorter side (detector.min_size)
}


@dataclass(frozen=True)
class Recipe:
    dataset: str
    input_size: int
    eval_resize: Optional[int]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    crop: str
    scale: Tuple[float, float]
    ratio: Tuple[float, float]
    padding: int
    hflip: float
    color_jitter: Optional[Tuple[float, float, float, float]]   # brightness, contrast, saturation, hue
    lighting: float
    lighting_layout: str
    fast_decode: bool
    channels_last: bool


def _jitter(value):
    if not value:
        return None
    if isinstance(value, (int, float)):
        return (float(value),) * 3 + (0.0,)
    value = [float(v) for v in value] + [0.0] * (4 - len(value))
    return tuple(value) if any(value) else None


def build_recipe(data_cfg):
    """Resolve presets and ``null`` keys of a ``data:`` section into a :class:`Recipe`."""
    cfg = resolve(data_cfg)
    family = _FAMILY[cfg["dataset"]]
    size_default, norm_default, aug_default = _DEFAULTS[family]
    size = cfg["input_size"] or size_default

    norm = norm_default if cfg["normalize"] == "auto" else cfg["normalize"]
    mean, std = NORMALIZATION[norm]
    mean = tuple(float(v) for v in (cfg["mean"] or mean))
    std = tuple(float(v) for v in (cfg["std"] or std))

    aug_cfg = cfg["augment"]
    preset = aug_default if aug_cfg["preset"] == "auto" else aug_cfg["preset"]
    aug = dict(AUGMENT[preset])
    for key in aug:
        if aug_cfg[key] is not None:
            aug[key] = aug_cfg[key]
    if aug["padding"] is None:
        aug["padding"] = max(1, size // 8)
    if aug["crop"] == "pad" and family == "imagenet":
        raise ConfigError(f"data.augment.crop=pad is for in-memory datasets (CIFAR, digits), not "
                          f"{cfg['dataset']}; use random_resized or none")

    eval_resize = cfg["eval_resize"]
    if eval_resize is None and family == "imagenet":
        eval_resize = int(size / 0.875)
    if eval_resize is not None and eval_resize < size:
        raise ConfigError(f"data.eval_resize={eval_resize} is smaller than data.input_size={size}; "
                          f"the center crop needs eval_resize >= input_size")
    return Recipe(
        dataset=cfg["dataset"], input_size=size, eval_resize=eval_resize, mean=mean, std=std,
        crop=aug["crop"], scale=tuple(aug["scale"]), ratio=tuple(aug["ratio"]), padding=int(aug["padding"]),
        hflip=float(aug["hflip"]), color_jitter=_jitter(aug["color_jitter"]), lighting=float(aug["lighting"]),
        lighting_layout=aug["lighting_layout"], fast_decode=cfg["fast_decode"], channels_last=cfg["channels_last"])
