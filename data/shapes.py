"""A small COCO-format detection set made on the fly: coloured shapes on noisy backgrounds.

``make_shapes_coco(root)`` writes the standard COCO layout::

    root/annotations/instances_train2017.json   root/train2017/000000000001.png ...
    root/annotations/instances_val2017.json     root/val2017/...

Three categories with non-contiguous ids (as COCO's 1..90 with gaps), so the
label mapping is exercised: circle (1), square (3), triangle (7). Every object
has a box (``[x, y, w, h]``), a polygon mask, its area and ``iscrowd: 0``;
image sizes vary around ``size`` (landscape and portrait, for aspect-ratio
grouping) and about one image in ten has no objects. The same seed writes the
same files (a split's images depend on the seed and its name only). Tests and the CPU demo (docs/detection.md) train detectors on it.
"""
import json
import math
import os
import zlib

import numpy as np

CATEGORIES = [{"id": 1, "name": "circle", "supercategory": "shape"},
              {"id": 3, "name": "square", "supercategory": "shape"},
              {"id": 7, "name": "triangle", "supercategory": "shape"}]
SPLITS = {"train2017": 200, "val2017": 50}


def _polygon(kind, cx, cy, r, angle):
    """Vertices of a shape of 'radius' r centred at (cx, cy), as a flat [x1, y1, x2, y2, ...] list."""
    n, phase = {"circle": (24, 0.0), "square": (4, math.pi / 4), "triangle": (3, -math.pi / 2)}[kind]
    if kind != "circle":
        phase += angle
    pts = []
    for k in range(n):
        a = phase + 2 * math.pi * k / n
        pts += [cx + r * math.cos(a), cy + r * math.sin(a)]
    return pts


def _image(rng, width, height, max_objects):
    """(uint8 H x W x 3 array, list of (category id, polygon, mask)) for one image."""
    from PIL import Image, ImageDraw
    base = rng.integers(0, 256, 3)
    noise = rng.normal(0, 18, (height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    objects = []
    count = 0 if rng.random() < 0.1 else int(rng.integers(1, max_objects + 1))
    for _ in range(count):
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        r = float(rng.uniform(0.08, 0.22) * min(width, height))
        cx, cy = float(rng.uniform(r, width - r)), float(rng.uniform(r, height - r))
        poly = [round(v, 2) for v in _polygon(cat["name"], cx, cy, r, float(rng.uniform(0, math.pi)))]
        colour = tuple(int(c) for c in (base + 128 + rng.integers(-40, 40, 3)) % 256)
        draw.polygon(poly, fill=colour)
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).polygon(poly, fill=1)
        objects.append((cat["id"], poly, np.array(mask, dtype=bool)))
    # a later shape may cover an earlier one: each mask keeps only what is visible (flag: covered)
    visible = np.zeros((height, width), dtype=bool)
    for i in range(len(objects) - 1, -1, -1):
        cat, poly, mask = objects[i]
        objects[i] = (cat, poly, mask & ~visible, bool((mask & visible).any()))
        visible |= mask
    return np.array(img), [o for o in objects if o[2].sum() >= 16]


def _annotation(ann_id, image_id, obj):
    """COCO annotation of one object: its drawn polygon, or the exact RLE of its visible part when covered."""
    from pycocotools import mask as mask_utils
    cat, poly, mask, covered = obj
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    segm = [poly]
    if covered:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        segm = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": 0, "segmentation": segm,
            "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0], "area": float(mask.sum())}


def make_shapes_coco(root, sizes=None, size=128, max_objects=3, seed=0):
    """Write the set under ``root`` (splits ``{'train2017': 200, 'val2017': 50}`` by default); returns ``root``.

    ``size``: the shorter image side is about this (the longer one up to 1.5x, either orientation).
    """
    from PIL import Image
    sizes = dict(SPLITS if sizes is None else sizes)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for split, count in sizes.items():
        ann_id = 1
        rng = np.random.default_rng([seed, zlib.crc32(split.encode())])  # a split depends on its name only
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, anns = [], []
        for image_id in range(1, count + 1):
            long = int(size * rng.uniform(1.0, 1.5))
            width, height = (long, size) if rng.random() < 0.5 else (size, long)
            pixels, objects = _image(rng, width, height, max_objects)
            name = f"{image_id:012d}.png"
            Image.fromarray(pixels).save(os.path.join(root, split, name))
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
            for obj in objects:
                anns.append(_annotation(ann_id, image_id, obj))
                ann_id += 1
        doc = {"info": {"description": "blocklab shapes (data/shapes.py)", "seed": seed}, "licenses": [],
               "images": images, "annotations": anns, "categories": CATEGORIES}
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(doc, f)
    return root

