"""Builders the engine calls: the dataset of a split and the device transform."""
import os

from core.fields import ConfigError

from .arrays import CIFAR, ArrayDataset, SyntheticDataset, load_cifar, load_digits
from .files import _check_num_classes, folder_dataset, list_dataset
from .recipe import build_recipe
from .schema import resolve
from .transforms import ArrayEval, ArrayTrain, DeviceTransform, FileEval, FileTrain

SPLITS = ("train", "val")


def _expected_classes(cfg, num_classes):
    declared = cfg["num_classes"]
    if declared is not None and num_classes is not None and declared != num_classes:
        raise ConfigError(f"data.num_classes={declared} but model.num_classes={num_classes}; make them equal "
                          f"(or drop data.num_classes)")
    return declared if declared is not None else num_classes


def _root(cfg):
    root = cfg["root"]
    if not root:
        raise ConfigError(f"data.root is not set; dataset {cfg['dataset']} needs data.root=/path/to/the/dataset")
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise ConfigError(f"data.root {root} does not exist or is not a folder; set data.root to where "
                          f"{cfg['dataset']} is")
    return root


def _coco(cfg, split, num_classes, masks, hflip):
    from .coco import CocoDetection
    root, train = _root(cfg), split == "train"
    ann = os.path.join(root, cfg["train_ann"] if train else cfg["val_ann"])
    dataset = CocoDetection(os.path.join(root, cfg["train_dir"] if train else cfg["val_dir"]), ann, train,
                            masks=masks, hflip=hflip if train else 0.0)
    if num_classes is not None and dataset.num_classes != num_classes:
        raise ConfigError(f"{ann} has {dataset.num_classes} categories but detector.num_classes={num_classes}; "
                          f"set detector.num_classes={dataset.num_classes}")
    return dataset


def build_dataset(data_cfg, split, num_classes=None, masks=False):
    """Dataset of ``split`` ('train' | 'val') yielding ``(uint8 CHW tensor, int label)``.

    ``num_classes``: the model's class count; the classes found (folder tree, CIFAR,
    digits) must match it, list labels must lie in [0, num_classes). The dataset has
    ``num_classes`` and ``num_skipped`` attributes. ``coco`` yields ``(image, target dict)`` instead
    (data/coco.py; ``num_classes`` counts object categories, ``masks`` adds instance masks).
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    cfg = resolve(data_cfg)
    recipe = build_recipe(cfg)
    expected = _expected_classes(cfg, num_classes)
    kind, train = cfg["dataset"], split == "train"
    if kind == "coco":
        return _coco(cfg, split, num_classes, masks, recipe.hflip)

    if kind in ("imagenet_folder", "imagenet_list"):
        root = _root(cfg)
        transform = FileTrain(recipe) if train else FileEval(recipe)
        verify = 0 if cfg["skip_bad_images"] else cfg["verify_images"]  # skipping them was asked for
        image_dir = os.path.join(root, cfg["train_dir"] if train else cfg["val_dir"])
        if kind == "imagenet_folder":
            other = None if train else os.path.join(root, cfg["train_dir"])
            return folder_dataset(image_dir, transform, expected, other, cfg["skip_bad_images"], verify)
        list_path = os.path.join(root, cfg["train_list"] if train else cfg["val_list"])
        return list_dataset(image_dir, list_path, transform, expected, cfg["skip_bad_images"], verify)

    transform = ArrayTrain(recipe) if train else ArrayEval(recipe)
    if kind in CIFAR:
        images, labels, classes = load_cifar(_root(cfg), kind, split)
        _check_num_classes(CIFAR[kind][4], expected, kind)
        return ArrayDataset(images, labels, CIFAR[kind][4], transform, classes)
    if kind == "digits":
        _check_num_classes(10, expected, "digits")
        images, labels = load_digits(split, recipe.input_size)
        return ArrayDataset(images, labels, 10, transform, [str(d) for d in range(10)])
    syn = cfg["synthetic"]
    classes = syn["num_classes"] or expected or 10
    _check_num_classes(classes, expected, "synthetic")
    size = syn["train_size"] if train else syn["val_size"]
    return SyntheticDataset(size, recipe.input_size, classes, transform, stream=0 if train else 1)


def build_device_transform(data_cfg, split):
    """Module the engine applies to each uint8 batch once it is on the device (float, /255, lighting, normalise)."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    r = build_recipe(data_cfg)
    return DeviceTransform(r.mean, r.std, r.lighting if split == "train" else 0.0, r.lighting_layout,
                           r.channels_last)
