"""The ``data:`` section of the config: every key, its default and what it means.

Keys whose default is ``null`` take their value from the dataset's preset (see
``data/recipe.py``): an ImageNet dataset gets the torchvision/CENet recipe
(RandomResizedCrop 224 + flip for training, resize 256 + center crop 224 for
evaluation, ImageNet mean/std), CIFAR gets pad-4 crops + flip, ``digits`` gets
small shifts and no flip. The batch size is not here: the engine passes it.
"""
from collections.abc import Mapping

from core.config import validate
from core.fields import ConfigError, Field, at_least, in_range

DATASETS = ("imagenet_folder", "imagenet_list", "cifar10", "cifar100", "digits", "synthetic", "coco")
NORMALIZE = ("auto", "imagenet", "cifar10", "cifar100", "digits", "half", "none")
AUGMENT_PRESETS = ("auto", "imagenet", "cenet", "cifar", "digits", "detection", "none")
CROPS = ("random_resized", "pad", "none")


def _pair(value, path):
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            and 0 < value[0] <= value[1]):
        raise ConfigError(f"{path} must be a list [low, high] with 0 < low <= high, got {value!r}")


def _triple(value, path):
    if not (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{path} must be a list of 3 numbers (one per RGB channel), got {value!r}")


def _positive_triple(value, path):
    _triple(value, path)
    if min(value) <= 0:
        raise ConfigError(f"{path} must be positive, got {value!r}")


def _jitter(value, path):
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0) or (
        isinstance(value, (list, tuple)) and len(value) in (3, 4)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value))
    if not ok:
        raise ConfigError(f"{path} must be a number >= 0 or [brightness, contrast, saturation(, hue)], got {value!r}")
    hue = value[3] if isinstance(value, (list, tuple)) and len(value) == 4 else 0
    if hue > 0.5:
        raise ConfigError(f"{path}: hue jitter must be <= 0.5, got {hue}")


MAX_INPUT_SIZE = 8192  # one 8192^2 RGB image is 0.8 GB as float32; the largest shipped input is 1333 (COCO)


def _image_side(value, path):
    """input_size / eval_resize: at least 1, at most MAX_INPUT_SIZE (refused before anything is allocated)."""
    if value < 1:
        raise ConfigError(f"{path} must be >= 1, got {value}")
    if value > MAX_INPUT_SIZE:
        gb = 3 * value * value * 4 / 1e9
        raise ConfigError(f"{path}={value:,} is larger than {MAX_INPUT_SIZE:,} (at most): one {value:,}x{value:,} "
                          f"image alone is {gb:,.1f} GB as float32; use the size the model is made for (224 for "
                          f"ImageNet, 32 for CIFAR)")


MAX_SYNTHETIC = 10_000_000  # labels take 8 bytes each; the per-image seed must stay below 2**31


def _prob(value, path):
    if not 0 <= value <= 1:
        raise ConfigError(f"{path} is a probability in [0, 1], got {value}")


DATA_SCHEMA = {
    "dataset": Field("digits", "which dataset: imagenet_folder (class-folder tree, torchvision ImageFolder), "
                     "imagenet_list (root + 'relative/path label' list files, CENet/ED-Net format), "
                     "cifar10/cifar100 (torchvision's python files on disk), digits (embedded, scikit-learn), "
                     "synthetic (random images for benchmarks), coco (COCO-format instances_*.json + image folders, "
                     "for task: detection; see docs/detection.md)", choices=DATASETS),
    "root": Field(None, "dataset folder: ImageNet: holds train_dir/val_dir (and the list files); "
                  "CIFAR: holds cifar-10-batches-py/ or cifar-100-python/; unused by digits and synthetic",
                  type=(str,), nullable=True),
    "train_dir": Field("train", "training images, relative to root: the class folders (imagenet_folder) or "
                       "the folder list paths are relative to (imagenet_list)"),
    "val_dir": Field("val", "validation images, relative to root (same meaning as train_dir)"),
    "train_list": Field("train.txt", "imagenet_list: training list file, relative to root unless absolute"),
    "val_list": Field("val.txt", "imagenet_list: validation list file, relative to root unless absolute"),
    "train_ann": Field("annotations/instances_train2017.json", "coco: training annotation file, relative to "
                       "root unless absolute (images in root/train_dir)"),
    "val_ann": Field("annotations/instances_val2017.json", "coco: validation annotation file, relative to root "
                     "unless absolute (images in root/val_dir)"),
    "num_classes": Field(None, "expected number of classes; null = the model's num_classes (passed by the engine); "
                         "list labels must lie in [0, num_classes), folder trees must have that many classes",
                         type=(int,), nullable=True, check=at_least(1)),
    "input_size": Field(None, "side of the square images fed to the model; null = 224 for ImageNet and synthetic, "
                        "32 for CIFAR and digits (synthetic images are generated at this size); at most 8192",
                        type=(int,), nullable=True, check=_image_side),
    "eval_resize": Field(None, "evaluation: resize the shorter side to this, then center-crop input_size "
                         "(single-crop protocol); null = input_size / 0.875 (256 for 224) for ImageNet, "
                         "no resize for the others; at most 8192", type=(int,), nullable=True, check=_image_side),
    "normalize": Field("auto", "mean/std preset applied on the device; auto = the dataset's own", choices=NORMALIZE),
    "mean": Field(None, "per-channel RGB mean in [0, 1], overrides the normalize preset", type=(list,),
                  nullable=True, check=_triple),
    "std": Field(None, "per-channel RGB std in [0, 1], overrides the normalize preset", type=(list,),
                 nullable=True, check=_positive_triple),
    "channels_last": Field(False, "the device transform returns channels_last batches"),
    "fast_decode": Field(True, "training on image files: sample the crop on full-size coordinates, decode at a "
                         "reduced JPEG (DCT) scale when the crop allows, decode with torchvision.io and resize on "
                         "uint8 tensors; false = PIL decode + resize exactly like torchvision's reference "
                         "(same crop distribution either way)"),
    "augment": {
        "preset": Field("auto", "training recipe: imagenet (RandomResizedCrop + flip), cenet (imagenet + PCA "
                        "lighting 0.1 as CENet), cifar (pad-4 crop + flip), digits (small shifts, no flip), detection "
                        "(flip only; the detector resizes), none; "
                        "auto = by dataset; the keys below override single parts", choices=AUGMENT_PRESETS),
        "crop": Field(None, "random_resized (RandomResizedCrop), pad (zero-pad then random crop), none "
                      "(eval-style resize/center crop)", type=(str,), nullable=True, choices=CROPS),
        "scale": Field(None, "random_resized: range of the crop's area fraction (torchvision: [0.08, 1.0])",
                       type=(list,), nullable=True, check=_pair),
        "ratio": Field(None, "random_resized: range of the crop's aspect ratio (torchvision: [0.75, 1.333])",
                       type=(list,), nullable=True, check=_pair),
        "padding": Field(None, "pad crop: pixels of zero padding on each side (CIFAR: 4)", type=(int,),
                         nullable=True, check=at_least(0)),
        "hflip": Field(None, "probability of a horizontal flip", type=(int, float), nullable=True, check=_prob),
        "color_jitter": Field(None, "torchvision ColorJitter strengths: a number (brightness = contrast = "
                              "saturation) or [b, c, s(, hue)]; 0 = off", type=(int, float, list),
                              nullable=True, check=_jitter),
        "lighting": Field(None, "std of the AlexNet PCA lighting noise, applied on the device (CENet: 0.1); 0 = off",
                          type=(int, float), nullable=True, check=at_least(0)),
        "lighting_layout": Field(None, "eigenvector layout: cenet (rows of CENet's ColorAugmentation matrix, as "
                                 "that repository computes it) or alexnet (columns, as fb.resnet.torch)",
                                 type=(str,), nullable=True, choices=("cenet", "alexnet")),
    },
    "workers": Field(4, "DataLoader worker processes per rank (0 = load in the main process)", check=at_least(0)),
    "prefetch_factor": Field(2, "batches each worker loads ahead", check=at_least(1)),
    "pin_memory": Field(True, "page-locked batches for asynchronous host-to-GPU copies (ignored without CUDA)"),
    "persistent_workers": Field(True, "keep worker processes alive between epochs"),
    "verify_images": Field(50000, "image folders/lists of at most this many files: check every image's header "
                           "and end marker before the run starts (about 80 us per file; 0: never); every "
                           "listed file's existence is always checked", check=at_least(0)),
    "skip_bad_images": Field(False, "replace an unreadable image by the next readable one and log it (the count "
                             "is dataset.num_skipped) instead of stopping with an error"),
    "synthetic": {
        "train_size": Field(1024, "synthetic: number of training images (at most 10,000,000)",
                            check=in_range(1, MAX_SYNTHETIC)),
        "val_size": Field(256, "synthetic: number of validation images (at most 10,000,000)",
                          check=in_range(1, MAX_SYNTHETIC)),
        "num_classes": Field(None, "synthetic: number of classes; null = data.num_classes, else the model's, "
                             "else 10", type=(int,), nullable=True, check=at_least(1)),
    },
}


def resolve(data_cfg, schema=DATA_SCHEMA, path="data"):
    """Return a plain nested dict: ``data_cfg`` checked against ``schema`` with the defaults filled in.

    The config loader already does this for whole configs; the data builders call it too so that
    they accept a partial Mapping (tests, scripts) with the same validator and the same strictness.
    """
    data_cfg = {} if data_cfg is None else data_cfg
    if not isinstance(data_cfg, Mapping):
        raise ConfigError(f"{path} must be a mapping of keys, got {type(data_cfg).__name__}")
    return validate(dict(data_cfg), schema, f"{path}.")
