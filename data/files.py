"""ImageNet on disk: a class-folder tree (torchvision ImageFolder) or a root plus a list file.

List files are the CENet / ED-Net format: one ``relative/path label`` per line (blank
lines ignored; the path may contain spaces, the label is the last field). Everything
that can be checked without decoding is checked when the dataset is built: missing
folders and files, unparsable lines, labels outside [0, num_classes), empty class
folders, class trees whose train and val folders disagree, listed files that do not exist,
symlinked folders reached twice; and for small sets, images that are empty, cut short or
no image at all (``data/index_check.py``). Other unreadable images surface when they are
loaded, naming the file (and its list line).
"""
import logging
import multiprocessing as mp
import os

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from .decode import BadImage, read_bytes
from .errors import DataError
from .index_check import check_index

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_BAD = 50


class _Strings:
    """A compact list of strings (one bytes buffer + offsets): workers share it without copy-on-read growth."""

    def __init__(self, strings):
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")


class ImageFiles(Dataset):
    """Image files with integer labels -> ``(uint8 CHW tensor, label)``.

    ``dataset[i]`` uses the global RNG; ``dataset[(i, seed)]`` (what the training
    sampler yields) draws the augmentation from a generator seeded with ``seed``, so a
    sample's augmentation depends only on (run seed, epoch, index).
    With ``skip_bad_images`` an unreadable image is logged, counted in ``num_skipped``
    (shared by all workers of this process) and replaced by the next readable one.
    """

    def __init__(self, image_dir, paths, labels, num_classes, transform, source, lines=None, classes=None,
                 skip_bad_images=False):
        self.image_dir, self.paths, self.transform = image_dir, _Strings(paths), transform
        self.labels = np.asarray(labels, dtype=np.int64)
        self.lines = None if lines is None else np.asarray(lines, dtype=np.int64)
        self.num_classes, self.classes, self.source = num_classes, classes, source
        self.skip_bad_images = skip_bad_images
        self._skipped = mp.Value("q", 0)

    def __len__(self):
        return len(self.labels)

    @property
    def num_skipped(self):
        """Unreadable images replaced so far (this process and its workers)."""
        return self._skipped.value

    def path(self, index):
        return os.path.join(self.image_dir, self.paths[index])

    def where(self, index):
        return f" (line {self.lines[index]} of {self.source})" if self.lines is not None else ""

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        g = None if seed is None else torch.Generator().manual_seed(int(seed))
        for attempt in range(MAX_CONSECUTIVE_BAD):
            i = (index + attempt) % len(self)
            try:
                return self.transform(read_bytes(self.path(i)), g), int(self.labels[i])
            except (BadImage, OSError) as e:
                reason = str(e) if isinstance(e, BadImage) else f"{type(e).__name__}: {e.strerror or e}"
                if not self.skip_bad_images:
                    raise DataError(f"cannot read image {self.path(i)}{self.where(i)}: {reason}; replace or "
                                    f"remove it, or set data.skip_bad_images=true to skip such images") from None
                with self._skipped.get_lock():
                    self._skipped.value += 1
                log.warning("skipped unreadable image %s%s: %s (data.skip_bad_images=true)",
                            self.path(i), self.where(i), reason)
        raise DataError(f"{MAX_CONSECUTIVE_BAD} consecutive unreadable images from {self.path(index)}"
                        f"{self.where(index)}; check data.root and the image files")


def _need_dir(path, what):
    if not os.path.isdir(path):
        raise DataError(f"{what} {path} does not exist or is not a folder; set data.root (and "
                        f"data.train_dir/val_dir) to where the images are")


def _check_num_classes(found, expected, where):
    if expected is not None and found != expected:
        raise DataError(f"{where} has {found} classes but num_classes={expected}; make model.num_classes "
                        f"(and data.num_classes) {found} or point data.root at the right dataset")


def scan_folder(image_dir, expected_classes=None, reference_dir=None):
    """Class-folder tree -> (paths relative to image_dir, labels, classes); torchvision's ImageFolder rules."""
    _need_dir(image_dir, "image folder")
    try:
        classes, class_to_idx = find_classes(image_dir)
    except FileNotFoundError:
        raise DataError(f"no class folders in {image_dir}; an ImageFolder tree holds one folder of images "
                        f"per class (or use dataset: imagenet_list with a list file)") from None
    if reference_dir is not None and os.path.isdir(reference_dir):
        ref_classes = find_classes(reference_dir)[0]
        if ref_classes != classes:
            diff = sorted(set(ref_classes) ^ set(classes))[:3]
            raise DataError(f"class folders of {image_dir} differ from those of {reference_dir} (e.g. {diff}); "
                            f"labels would not match between splits; make both trees hold the same classes")
    _check_num_classes(len(classes), expected_classes, image_dir)
    seen = {os.path.realpath(image_dir): image_dir}  # a link back to the root is a loop too
    samples = [(p, class_to_idx[c]) for c in classes for p in _class_files(os.path.join(image_dir, c), seen)]
    counts = np.bincount([c for _, c in samples], minlength=len(classes))
    if (counts == 0).any():
        empty = classes[int(np.argmin(counts))]
        raise DataError(f"class folder {os.path.join(image_dir, empty)} has no images "
                        f"({', '.join(IMG_EXTENSIONS)}); add its images or remove the folder")
    prefix = os.path.join(os.path.expanduser(image_dir), "")
    paths = [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, image_dir) for p, _ in samples]
    return paths, [c for _, c in samples], classes


def _class_files(class_dir, seen):
    """Image files under ``class_dir`` in ImageFolder's order (links followed, as torchvision does).

    ``seen`` maps the real path of every folder scanned so far to the name it was reached by; a
    folder reached twice (a symlink loop, or a link to another class) is refused: its images
    would be counted again, under this class's label.
    """
    found = []
    for root, _, files in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            raise DataError(f"folder {root} is {seen[real]} again (a symlink loop or a link to another folder "
                            f"of the tree): its images would be counted twice and mislabelled; remove the link")
        seen[real] = root
        found.append((root, sorted(f for f in files if f.lower().endswith(IMG_EXTENSIONS))))
    return [os.path.join(root, f) for root, names in sorted(found) for f in names]


def parse_list(list_path, num_classes=None):
    """``relative/path label`` lines -> (paths, labels, line numbers), refusing bad lines and labels."""
    if not os.path.isfile(list_path):
        raise DataError(f"list file {list_path} not found; set data.train_list/val_list (relative to data.root "
                        f"unless absolute) to a file of 'relative/path label' lines")
    paths, labels, lines = [], [], []
    try:
        with open(list_path, encoding="utf-8") as f:
            for n, raw in enumerate(f, 1):
                line = raw.strip()
                if not line:
                    continue
                parts = line.rsplit(None, 1)
                if len(parts) != 2:
                    raise DataError(f"{list_path}:{n}: expected 'relative/path label', got {line!r}")
                try:
                    label = int(parts[1])
                except ValueError:
                    raise DataError(f"{list_path}:{n}: label {parts[1]!r} is not an integer "
                                    f"(expected 'relative/path label')") from None
                if label < 0 or (num_classes is not None and label >= num_classes):
                    bound = num_classes if num_classes is not None else "num_classes"
                    raise DataError(f"{list_path}:{n}: label {label} is outside [0, {bound}); fix the list or "
                                    f"set model.num_classes to cover it")
                paths.append(parts[0])
                labels.append(label)
                lines.append(n)
    except UnicodeDecodeError as e:
        raise DataError(f"{list_path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"expected 'relative/path label' lines") from None
    if not paths:
        raise DataError(f"list file {list_path} has no entries; expected 'relative/path label' lines")
    return paths, labels, lines


def folder_dataset(image_dir, transform, num_classes=None, reference_dir=None, skip_bad_images=False,
                   verify_images=0):
    paths, labels, classes = scan_folder(image_dir, num_classes, reference_dir)
    check_index(image_dir, paths, lambda i: "", verify_images)
    return ImageFiles(image_dir, paths, labels, len(classes), transform, source=image_dir, classes=classes,
                      skip_bad_images=skip_bad_images)


def list_dataset(image_dir, list_path, transform, num_classes=None, skip_bad_images=False, verify_images=0):
    _need_dir(image_dir, "image folder")
    paths, labels, lines = parse_list(list_path, num_classes)
    check_index(image_dir, paths, lambda i: f" (line {lines[i]} of {list_path})", verify_images)
    found = num_classes if num_classes is not None else max(labels) + 1
    return ImageFiles(image_dir, paths, labels, found, transform, source=list_path, lines=lines,
                      skip_bad_images=skip_bad_images)
