"""In-memory datasets: CIFAR-10/100 from torchvision's files on disk, the embedded digits, synthetic images."""
import importlib.util
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import DataError

CIFAR = {  # name -> (folder, train files, test files, label key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}
CIFAR_URL = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
             "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"}
DIGITS_VAL = 360          # fixed stratified split of the 1797 digits: 1437 train / 360 val
DIGITS_SPLIT_SEED = 0


class ArrayDataset(Dataset):
    """uint8 images held in memory -> ``(uint8 CHW tensor, label)``; keys as in ``ImageFiles``."""

    def __init__(self, images, labels, num_classes, transform, classes=None):
        self.images, self.labels = images, torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        self.num_classes, self.transform, self.classes = num_classes, transform, classes
        self.num_skipped = 0

    def __len__(self):
        return len(self.labels)

    def image(self, index):
        return self.images[index]

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        g = None if seed is None else torch.Generator().manual_seed(int(seed))
        return self.transform(self.image(index), g), int(self.labels[index])


class SyntheticDataset(ArrayDataset):
    """Deterministic random images of any size and resolution (benchmarks, smoke tests).

    Image i is noise from a generator seeded with i plus a colour tied to its label
    (i % num_classes), so a model can learn it; nothing is stored.
    """

    def __init__(self, size, resolution, num_classes, transform, stream=0):
        super().__init__(None, np.arange(size) % num_classes, num_classes, transform)
        self.resolution, self.stream = resolution, stream
        palette = torch.randint(0, 128, (num_classes, 3, 1, 1), generator=torch.Generator().manual_seed(1234))
        self.palette = palette.to(torch.uint8)

    def image(self, index):
        g = torch.Generator().manual_seed(2 * index + self.stream)   # CPU generators keep 32 seed bits
        r = self.resolution
        noise = torch.randint(0, 128, (3, r, r), generator=g, dtype=torch.uint8)
        return noise + self.palette[index % self.num_classes]


class _CifarUnpickler(pickle.Unpickler):
    """Loads CIFAR's pickles without running arbitrary code: only numpy array reconstruction is allowed."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_folder(root, name):
    folder, train_files, _, _, _ = CIFAR[name]
    for candidate in (os.path.join(root, folder), root):
        if os.path.isfile(os.path.join(candidate, train_files[0])):
            return candidate
    raise DataError(f"{name} files not found: expected {os.path.join(root, folder, train_files[0])} "
                    f"(torchvision's python format; nothing is downloaded here): download {CIFAR_URL[name]} "
                    f"and extract it into {root}, or set data.root to the folder that holds {folder}/")


def load_cifar(root, name, split):
    """(images uint8 N x 3 x 32 x 32, labels, class names) from torchvision's CIFAR files."""
    folder, train_files, test_files, label_key, _ = CIFAR[name]
    base = _cifar_folder(root, name)
    images, labels = [], []
    for fname in train_files if split == "train" else test_files:
        path = os.path.join(base, fname)
        try:
            with open(path, "rb") as f:
                entry = _CifarUnpickler(f, encoding="latin1").load()
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lab = np.asarray(entry[label_key], dtype=np.int64)
        except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
            raise DataError(f"cannot read {path} ({type(e).__name__}: {e}); re-extract {CIFAR_URL[name]} "
                            f"into {root}") from None
        if len(lab) != len(data):
            raise DataError(f"{path}: {len(data)} images but {len(lab)} labels; re-extract the archive")
        images.append(data)
        labels.append(lab)
    classes = None
    meta = os.path.join(base, "batches.meta" if name == "cifar10" else "meta")
    if os.path.isfile(meta):
        try:
            with open(meta, "rb") as f:
                entry = _CifarUnpickler(f, encoding="latin1").load()
            classes = entry.get("label_names") or entry.get("fine_label_names")
        except (OSError, EOFError, pickle.UnpicklingError):
            classes = None
    return torch.from_numpy(np.concatenate(images)), np.concatenate(labels), classes


def _digits_arrays():
    """(1797 x 8 x 8 float in [0, 16], labels) from the copy scikit-learn ships (without importing sklearn)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError("the digits dataset needs scikit-learn (pip install scikit-learn)")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return table[:, :64].reshape(-1, 8, 8), table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits   # layout changed: take the slow, public way
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digits_split(labels, n_val=DIGITS_VAL, seed=DIGITS_SPLIT_SEED):
    """Fixed stratified split: per class a fixed random subset, sizes by largest remainder to n_val."""
    rng = np.random.RandomState(seed)          # legacy generator: stream fixed across numpy versions
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_val / len(labels)
    take = np.floor(quota).astype(int)
    take[np.argsort(-(quota - take), kind="stable")[:n_val - take.sum()]] += 1
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)])
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def load_digits(split, size):
    """scikit-learn's handwritten digits as uint8 N x 3 x size x size (gray repeated), fixed split."""
    images, labels = _digits_arrays()
    train_idx, val_idx = digits_split(labels)
    idx = train_idx if split == "train" else val_idx
    x = torch.from_numpy(np.round(images[idx] * (255.0 / 16.0))).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < 8)
    x = x.round_().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return x, labels[idx]
