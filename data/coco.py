"""COCO-format detection data: ``instances_*.json`` + an image folder, as torchvision's detection references read it.

:class:`CocoDetection` yields ``(uint8 3 x H x W tensor, target)`` with target
``{'boxes': float N x 4 (x1, y1, x2, y2), 'labels': int64 N (1..K, 0 is the
background), 'image_id': int, 'masks': uint8 N x H x W (with masks=True)}``.
Category ids map to labels 1..K in increasing id order (COCO's ids have gaps).
Crowd boxes are left out of training targets (torchvision's references do the
same; COCOeval reads them from the annotation file). Training drops images
without usable annotations (``_coco_remove_images_without_annotations``);
evaluation keeps every image. The annotation file is checked whole before any
run starts: a missing or invalid file, a box outside its image, an unknown
category id refuse in one line naming the file and the entry; a corrupt image
names its file when it is read.
"""
import contextlib
import io
import json
import os

import numpy as np
import torch

from .errors import DataError


def _load_json(path):
    if not os.path.isfile(path):
        raise DataError(f"annotation file {path} not found; set data.root (and data.train_ann/val_ann) to a "
                        f"COCO-format set (root/annotations/instances_<split>.json)")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"annotation file {path} is not valid JSON ({e}); regenerate or re-download it") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(doc, dict) or
               not isinstance(doc.get(k), list)]
    if missing:
        raise DataError(f"annotation file {path} is not COCO instances format (no list '{missing[0]}'); "
                        f"use an instances_*.json file")
    return doc


def check_annotations(doc, path):
    """Refuse the first entry a detector cannot train or be evaluated on (one line naming it)."""
    cats = {c.get("id") for c in doc["categories"]}
    images = {}
    for im in doc["images"]:
        if not all(k in im for k in ("id", "file_name", "width", "height")):
            raise DataError(f"{path}: image entry {im.get('id', im)} lacks id/file_name/width/height; fix the file")
        images[im["id"]] = im
    for a in doc["annotations"]:
        where = f"{path}: annotation {a.get('id')} (image {a.get('image_id')})"
        if a.get("image_id") not in images:
            raise DataError(f"{where} refers to an image id not in 'images'; fix or remove the annotation")
        if a.get("category_id") not in cats:
            raise DataError(f"{where} has category_id {a.get('category_id')}, not one of the file's categories "
                            f"{sorted(cats)}; fix the id or add the category")
        box = a.get("bbox")
        im = images[a["image_id"]]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise DataError(f"{where}: bbox {box!r} is not [x, y, width, height]; fix it")
        x, y, w, h = box
        tol = 1.0  # COCO's own boxes reach up to a pixel past the border (float rounding of polygons)
        if w < 0 or h < 0 or x < -tol or y < -tol or x + w > im["width"] + tol or y + h > im["height"] + tol:
            raise DataError(f"{where}: bbox {box} lies outside its {im['width']}x{im['height']} image "
                            f"{im['file_name']}; fix the box or the image size")


class CocoDetection(torch.utils.data.Dataset):
    """One split of a COCO-format set (see the module docstring); ``hflip`` is the training flip probability.

    Indexed by ``i`` or by a ``(i, seed)`` key from the train sampler: the flip is drawn from the seed, so a
    sample's augmentation depends only on the run seed, the epoch and its position (as data/loader.py).
    """

    def __init__(self, image_dir, ann_file, train, masks=False, hflip=0.0):
        from pycocotools.coco import COCO
        doc = _load_json(ann_file)
        check_annotations(doc, ann_file)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco = COCO()
            self.coco.dataset = doc
            self.coco.createIndex()
        self.image_dir, self.ann_file, self.train, self.masks, self.hflip = image_dir, ann_file, train, masks, hflip
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.num_classes = len(self.cat_ids)
        self.classes = [self.coco.cats[c]["name"] for c in self.cat_ids]
        ids = sorted(self.coco.imgs)
        self.num_dropped = 0
        if train:
            kept = [i for i in ids if self._usable(i)]
            self.num_dropped = len(ids) - len(kept)
            ids = kept
        self.ids = ids

    def _usable(self, image_id):
        """torchvision's rule: some non-crowd box with positive width and height."""
        return any(not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1
                   for a in self.coco.imgToAnns.get(image_id, ()))

    def __len__(self):
        return len(self.ids)

    def aspect_ratios(self):
        """width / height of every image, in index order (for aspect-ratio grouping)."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def _read(self, info):
        from PIL import Image
        path = os.path.join(self.image_dir, info["file_name"])
        try:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"image {path} cannot be read ({type(e).__name__}: {e}); replace or remove it "
                            f"(image id {info['id']} in {self.ann_file})") from None
        if pixels.shape[:2] != (info["height"], info["width"]):
            raise DataError(f"image {path} is {pixels.shape[1]}x{pixels.shape[0]} but {self.ann_file} says "
                            f"{info['width']}x{info['height']}; fix the annotation file or the image")
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = self._read(info)
        anns = [a for a in self.coco.imgToAnns.get(image_id, ()) if not a.get("iscrowd", 0)]
        anns = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        h, w = info["height"], info["width"]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        target = {"boxes": boxes, "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns],
                                                         dtype=torch.int64), "image_id": image_id}
        if self.masks:
            masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
            target["masks"] = torch.from_numpy(masks)
        if self.train and self.hflip > 0 and seed is not None:
            if np.random.default_rng(seed).random() < self.hflip:
                image = image.flip(-1)
                target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
                if self.masks:
                    target["masks"] = target["masks"].flip(-1)
        return image, target


class Batch(list):
    """A list of images or targets that moves to a device like a tensor (``batch.to(device, non_blocking)``),
    so the engine's loop treats detection batches as it treats classification ones."""

    def to(self, device, non_blocking=False):
        return Batch(_to(x, device, non_blocking) for x in self)


def _to(x, device, non_blocking):
    if isinstance(x, dict):
        return {k: _to(v, device, non_blocking) for k, v in x.items()}
    return x.to(device, non_blocking=non_blocking) if torch.is_tensor(x) else x


def collate(batch):
    """``[(image, target), ...]`` -> ``(Batch of images, Batch of targets)`` (images keep their own sizes)."""
    images, targets = zip(*batch)
    return Batch(images), Batch(targets)


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches whose images share an orientation (width >= height or not), as torchvision's references group
    them: less padding per batch. Every epoch yields exactly ``len(sampler) // batch_size`` batches (ranks stay
    in step): the groups' leftovers, one group after the other, fill the last ones. ``set_skip(n)`` skips the
    first ``n`` batches of the next epoch (exact mid-epoch resume, data.loader.start_epoch)."""

    def __init__(self, sampler, group_ids, batch_size):
        self.sampler, self.group_ids, self.batch_size, self.skip = sampler, group_ids, batch_size, 0

    def set_skip(self, num_batches):
        self.skip = int(num_batches)

    def _batches(self):
        groups, done = {}, 0
        for key in self.sampler:
            index = key[0] if isinstance(key, tuple) else key
            group = groups.setdefault(self.group_ids[index], [])
            group.append(key)
            if len(group) == self.batch_size:
                yield list(group)
                group.clear()
                done += 1
        rest = [k for g in groups.values() for k in g]
        for i in range(len(self) - done):
            yield rest[i * self.batch_size:(i + 1) * self.batch_size]

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(self._batches()):
            if i >= skip:
                yield batch

    def __len__(self):
        return len(self.sampler) // self.batch_size
