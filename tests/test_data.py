"""Data pipeline: both ImageNet layouts, exactness against torchvision, bad data, samplers, loaders."""
import logging
import os
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from core.fields import ConfigError, Field
from data import DataError, build_dataset, build_device_transform, build_loader
from data import decode as decode_mod
from data.arrays import digits_split
from data.loader import ShardSampler, TrainSampler
from data.schema import DATA_SCHEMA, resolve
from data.transforms import PCA_EIGVAL, ColorJitter, sample_resized_crop

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLASSES = ["n01", "n02", "n03"]
SIZES = [(300, 220), (200, 280), (120, 90)]          # (width, height): down- and up-scaled by Resize(256)


def _photo(w, h, seed):
    """Textured RGB content (smooth gradients plus noise), not flat colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)
    img = base * rng.uniform(0.4, 1.0, 3) + rng.normal(0, 25, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _write_split(root, split, n_per_class):
    lines = []
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, split, name), exist_ok=True)
        for k in range(n_per_class):
            w, h = SIZES[(c + k) % len(SIZES)]
            rel = f"{name}/{name}_{k}.JPEG"
            _photo(w, h, seed=(split == "val") * 100 + c * 10 + k).save(os.path.join(root, split, rel), quality=90)
            lines.append(f"{rel} {c}")
    with open(os.path.join(root, f"{split}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def data_tree(tmp_path_factory):
    """root/{train,val}/<class>/*.JPEG plus root/{train,val}.txt in the CENet/ED-Net list format."""
    root = str(tmp_path_factory.mktemp("data_tree"))
    _write_split(root, "train", 3)
    _write_split(root, "val", 2)
    return root


def _cfg(root, kind="imagenet_folder", **extra):
    return dict(dict(dataset=kind, root=root, workers=0), **extra)


def _copy_tree(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


# ------------------------------------------------------------------ layouts and exactness
def test_folder_and_list_layouts_give_same_samples(data_tree):
    for split in ("train", "val"):
        a = build_dataset(_cfg(data_tree), split, num_classes=3)
        b = build_dataset(_cfg(data_tree, "imagenet_list"), split, num_classes=3)
        assert len(a) == len(b) == 3 * (3 if split == "train" else 2)
        assert [a.path(i) for i in range(len(a))] == [b.path(i) for i in range(len(b))]
        assert a.labels.tolist() == b.labels.tolist() and a.num_classes == b.num_classes == 3
        for i in range(len(a)):
            key = (i, 1000 + i)
            xa, ya = a[key]
            xb, yb = b[key]
            assert ya == yb and torch.equal(xa, xb) and xa.dtype == torch.uint8


def test_eval_transform_equals_torchvision_reference(data_tree):
    ds = build_dataset(_cfg(data_tree), "val", num_classes=3)
    to_input = build_device_transform(_cfg(data_tree), "val")
    ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    for i in range(len(ds)):
        with open(ds.path(i), "rb") as f:
            expected = ref(Image.open(f).convert("RGB"))
        x, _ = ds[i]
        assert x.shape == (3, 224, 224)
        assert torch.equal(to_input(x.unsqueeze(0))[0], expected)


def test_train_pil_path_equals_torchvision_reference(data_tree):
    """fast_decode=false reproduces torchvision's RandomResizedCrop + flip pipeline draw for draw."""
    cfg = _cfg(data_tree, fast_decode=False)
    ds = build_dataset(cfg, "train", num_classes=3)
    to_input = build_device_transform(cfg, "train")
    ref = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    for i in range(len(ds)):
        seed = 77 + i
        torch.manual_seed(seed)
        with open(ds.path(i), "rb") as f:
            expected = ref(Image.open(f).convert("RGB"))
        x, _ = ds[(i, seed)]
        assert torch.equal(to_input(x.unsqueeze(0))[0], expected)


def test_crop_sampler_matches_torchvision_get_params():
    rng = np.random.default_rng(0)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for k in range(300):
        h, w = (int(v) for v in rng.integers(1, 700, 2))
        if k % 10 == 0:
            h, w = 5, 600                                  # forces the fallback branch
        torch.manual_seed(k)
        expected = T.RandomResizedCrop.get_params(Image.new("RGB", (w, h)), scale, ratio)
        assert sample_resized_crop(h, w, scale, ratio, torch.Generator().manual_seed(k)) == tuple(expected)


def test_color_jitter_matches_torchvision():
    from torchvision.transforms import v2
    img = torch.randint(0, 256, (3, 9, 11), dtype=torch.uint8)
    for seed in range(5):
        torch.manual_seed(seed)
        expected = v2.ColorJitter(0.4, 0.3, 0.2, 0.1)(img)
        assert torch.equal(ColorJitter(0.4, 0.3, 0.2, 0.1)(img, torch.Generator().manual_seed(seed)), expected)


def test_fast_path_matches_pil_path_closely(data_tree, tmp_path):
    fast = build_dataset(_cfg(data_tree), "train", num_classes=3)
    slow = build_dataset(_cfg(data_tree, fast_decode=False), "train", num_classes=3)
    for i in range(len(fast)):
        a, b = fast[(i, i)][0].float(), slow[(i, i)][0].float()
        assert a.shape == b.shape == (3, 224, 224)
        assert (a - b).abs().mean() < 1.0                  # same crop; resize kernels agree to ~1 level


def test_reduced_dct_decode_keeps_the_crop(tmp_path, monkeypatch):
    """A crop >= 2x the output is decoded at 1/2..1/8 DCT scale; the result still shows the same region."""
    path = tmp_path / "big.jpg"
    _photo(640, 480, 3).save(path, quality=95)
    data = decode_mod.read_bytes(path)
    assert decode_mod.jpeg_size(data) == (640, 480)
    assert decode_mod.draft_factor((400, 300), (32, 32)) == 8 and decode_mod.draft_factor((60, 60), (32, 32)) == 1
    calls = []
    original = decode_mod._draft_crop
    monkeypatch.setattr(decode_mod, "_draft_crop", lambda *a: calls.append(a[-1]) or original(*a))
    box = (40, 100, 320, 400)
    out = decode_mod.decode_resized_crop(data, (640, 480), box, (32, 32))
    full = Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR, box=(100, 40, 500, 360))
    assert calls == [8] and out.shape == (3, 32, 32)
    assert (out.float() - torch.from_numpy(np.array(full)).permute(2, 0, 1).float()).abs().mean() < 4


# ------------------------------------------------------------------ bad data
def test_missing_root_and_list_file(data_tree, tmp_path):
    with pytest.raises(ConfigError, match="does-not-exist"):
        build_dataset(_cfg(str(tmp_path / "does-not-exist")), "train")
    with pytest.raises(ConfigError, match="data.root is not set"):
        build_dataset(dict(dataset="imagenet_list"), "train")
    with pytest.raises(DataError, match="nope.txt not found"):
        build_dataset(_cfg(data_tree, "imagenet_list", train_list="nope.txt"), "train")


@pytest.mark.parametrize("line, message", [
    ("n01/n01_0.JPEG", r"bad\.txt:2: expected 'relative/path label'"),
    ("n01/n01_0.JPEG one", r"bad\.txt:2: label 'one' is not an integer"),
    ("n01/n01_0.JPEG 3", r"bad\.txt:2: label 3 is outside \[0, 3\)"),
    ("n01/n01_0.JPEG -1", r"bad\.txt:2: label -1 is outside"),
])
def test_bad_list_lines_name_file_and_line(data_tree, line, message):
    path = os.path.join(data_tree, "bad.txt")
    with open(path, "w") as f:
        f.write(f"n01/n01_1.JPEG 0\n{line}\n")
    with pytest.raises(DataError, match=message):
        build_dataset(_cfg(data_tree, "imagenet_list", train_list="bad.txt"), "train", num_classes=3)


def test_first_listed_file_missing(data_tree):
    path = os.path.join(data_tree, "wrongroot.txt")
    with open(path, "w") as f:
        f.write("train/n01/n01_0.JPEG 0\n")
    with pytest.raises(DataError, match=r"1 of 1 listed images are missing, the first .*train/n01/n01_0\.JPEG "
                                        r"\(line 1 of .*wrongroot\.txt\)"):
        build_dataset(_cfg(data_tree, "imagenet_list", train_list="wrongroot.txt"), "train")


def test_empty_class_folder_and_class_mismatches(data_tree, tmp_path):
    root = _copy_tree(data_tree, tmp_path / "t")
    with pytest.raises(DataError, match="has 3 classes but num_classes=5"):
        build_dataset(_cfg(root), "train", num_classes=5)
    with pytest.raises(ConfigError, match="data.num_classes=4 but model.num_classes=3"):
        build_dataset(_cfg(root, num_classes=4), "train", num_classes=3)
    os.makedirs(os.path.join(root, "val", "n04"))
    with pytest.raises(DataError, match="differ from those of"):
        build_dataset(_cfg(root), "val")
    os.makedirs(os.path.join(root, "train", "n04"))
    with pytest.raises(DataError, match=r"class folder .*n04 has no images"):
        build_dataset(_cfg(root), "train")


@pytest.mark.parametrize("kind", ["imagenet_folder", "imagenet_list"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_image_names_the_file(data_tree, tmp_path, kind, damage):
    root = _copy_tree(data_tree, tmp_path / "t")
    bad = os.path.join(root, "train", "n02", "n02_1.JPEG")
    with open(bad, "rb") as f:
        raw = f.read()
    with open(bad, "wb") as f:
        f.write(raw[: len(raw) // 2] if damage == "truncate" else b"this is not an image" * 10)
    ds = build_dataset(_cfg(root, kind, verify_images=0), "train", num_classes=3)  # header check off: decode
    index = next(i for i in range(len(ds)) if ds.path(i) == bad)
    where = r" \(line 5 of .*train\.txt\)" if kind == "imagenet_list" else ""
    for fast in (True, False):
        ds.transform.fast = fast
        with pytest.raises(DataError, match=f"cannot read image .*n02_1.JPEG{where}: .*skip_bad_images"):
            ds[(index, 0)]


def test_bad_image_error_crosses_the_worker_boundary_and_skip_counts(data_tree, tmp_path, caplog):
    root = _copy_tree(data_tree, tmp_path / "t")
    bad = os.path.join(root, "val", "n01", "n01_0.JPEG")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated")
    cfg = _cfg(root, workers=1, persistent_workers=False, verify_images=0)
    ds = build_dataset(cfg, "val")
    with pytest.raises(DataError, match="cannot read image .*n01_0.JPEG"):
        list(build_loader(ds, cfg, "val", batch_size=2))
    cfg["skip_bad_images"] = True
    ds = build_dataset(cfg, "val")
    labels = torch.cat([y for _, y in build_loader(ds, cfg, "val", batch_size=2)])
    assert len(labels) == len(ds) and ds.num_skipped == 1         # counted in the worker, seen here
    with caplog.at_level(logging.WARNING, logger="data.files"):
        x, y = ds[0]                                               # replaced by the next image, logged
    assert y == 0 and ds.num_skipped == 2 and "skipped unreadable image" in caplog.text


def test_symlink_loop_or_linked_class_folder_is_refused(data_tree, tmp_path):
    """Issue 10.5: a link back up the tree repeated other classes' images under this class's label."""
    root = _copy_tree(data_tree, tmp_path / "t")
    os.symlink(os.path.join(root, "train"), os.path.join(root, "train", "n02", "loop"))
    with pytest.raises(DataError, match=r"folder .*train/n02/loop is .*train again \(a symlink loop"):
        build_dataset(_cfg(root), "train", num_classes=3)
    os.remove(os.path.join(root, "train", "n02", "loop"))
    os.symlink(os.path.join(root, "train", "n01"), os.path.join(root, "train", "n03", "more"))
    with pytest.raises(DataError, match=r"folder .*train/n03/more is .*train/n01 again"):
        build_dataset(_cfg(root), "train", num_classes=3)
    os.remove(os.path.join(root, "train", "n03", "more"))
    os.rename(os.path.join(root, "train", "n03"), os.path.join(root, "n03_elsewhere"))  # a linked class folder
    os.symlink(os.path.join(root, "n03_elsewhere"), os.path.join(root, "train", "n03"))
    ds = build_dataset(_cfg(root), "train", num_classes=3)
    assert len(ds) == 9 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def _list_tree(tmp_path, n=12):
    """root/train/c/i.JPEG for n images of 2 classes plus root/train.txt listing them."""
    root = tmp_path / "lt"
    lines = []
    for i in range(n):
        rel = f"c{i % 2}/{i}.JPEG"
        (root / "train" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        _photo(24, 20, seed=i).save(root / "train" / rel, quality=90)
        lines.append(f"{rel} {i % 2}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def _damage(path, how):
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2], "text": b"<html>not found</html>"}[how])


@pytest.mark.parametrize("how, message", [
    ("missing", r"1 of 12 listed images are missing, the first .*c1/9\.JPEG \(line 10 of .*train\.txt\)"),
    ("empty", r"image .*c1/9\.JPEG \(line 10 of .*train\.txt\) is empty \(0 bytes\)"),
    ("truncated", r"image .*c1/9\.JPEG \(line 10 of .*train\.txt\) is truncated \(\d+ bytes, no end marker\)"),
    ("text", r"image .*c1/9\.JPEG \(line 10 of .*train\.txt\) is not an image file \(starts with b'<html>no'\)"),
])
def test_whole_index_is_checked_before_anything_is_written(tmp_path, capsys, how, message):
    """Issue 10.8: the 10th listed file missing or damaged is refused before the work dir is touched."""
    from tools.train import run
    root = _list_tree(tmp_path)
    bad = root / "train" / "c1" / "9.JPEG"
    bad.unlink() if how == "missing" else _damage(bad, how)
    work = tmp_path / "work"
    argv = [os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "default.yaml"),
            "data.dataset=imagenet_list", f"data.root={root}", "data.val_list=train.txt", "data.val_dir=train",
            "data.workers=0", "data.input_size=16", "model.backbone=cifar_resnet20", "model.num_classes=2",
            "train.batch_size=4", f"runtime.work_dir={work}", "runtime.device=cpu"]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not work.exists()
    if how != "missing":  # with the header check off the same file is still refused, when it is decoded
        ds = build_dataset(_cfg(str(root), "imagenet_list", val_list="train.txt", verify_images=0), "train")
        with pytest.raises(DataError, match=r"cannot read image .*c1/9\.JPEG \(line 10 of"):
            ds[(9, 0)]


def test_cifar_files_on_disk(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*download .*extract it into"):
        build_dataset(dict(dataset="cifar10", root=str(tmp_path)), "train")
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = dict(data=rng.integers(0, 256, (4, 3072), dtype=np.uint8), labels=[0, 3, 9, 1])
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f)
    train = build_dataset(dict(dataset="cifar10", root=str(tmp_path), augment=dict(preset="none")), "train",
                          num_classes=10)
    val = build_dataset(dict(dataset="cifar10", root=str(tmp_path)), "val")
    assert len(train) == 20 and len(val) == 4 and train.num_classes == 10
    x, y = val[1]
    assert y == 3 and torch.equal(x, torch.from_numpy(batches["test_batch"]["data"][1].reshape(3, 32, 32)))
    with pytest.raises(DataError, match="cifar10 has 10 classes but num_classes=100"):
        build_dataset(dict(dataset="cifar10", root=str(tmp_path)), "val", num_classes=100)


# ------------------------------------------------------------------ embedded and synthetic data
def test_digits_embedded_dataset():
    train, val = build_dataset({}, "train"), build_dataset({}, "val")
    assert (len(train), len(val), train.num_classes) == (1437, 360, 10)
    counts = np.bincount(val.labels.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37                # stratified
    x, _ = val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and torch.equal(x[0], x[2])
    t1, t2 = train[(5, 1)][0], train[(5, 1)][0]
    assert torch.equal(t1, t2)                                      # augmentation fixed by the key's seed
    labels = np.arange(100) % 4
    tr, va = digits_split(labels, n_val=20)
    assert len(va) == 20 and not set(tr) & set(va) and np.bincount(labels[va]).tolist() == [5, 5, 5, 5]
    assert build_dataset(dict(input_size=16), "val")[0][0].shape == (3, 16, 16)


def test_synthetic_dataset():
    cfg = dict(dataset="synthetic", input_size=40, synthetic=dict(train_size=7, val_size=3, num_classes=5))
    ds = build_dataset(cfg, "train")
    assert len(ds) == 7 and ds.num_classes == 5 and ds[6][1] == 1
    assert ds[2][0].shape == (3, 40, 40) and torch.equal(ds[2][0], ds[2][0])
    assert not torch.equal(ds[0][0], build_dataset(cfg, "val")[0][0])
    assert build_dataset(dict(dataset="synthetic"), "val", num_classes=1000).num_classes == 1000


# ------------------------------------------------------------------ sampling and loading
def test_train_sampler_shuffles_per_epoch_and_shards():
    s = TrainSampler(10, seed=3)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(i for i, _ in e0) == list(range(10)) and e0 != e1
    s.set_epoch(0)
    assert list(s) == e0
    ranks = [list(TrainSampler(10, r, 3, seed=3)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks)                          # padded to equal length
    assert {i for r in ranks for i, _ in r} == set(range(10))
    seeds = [sd for r in ranks for _, sd in r]
    assert len(set(seeds)) == 10                                    # 12 slots, 2 are padding repeats


def test_shard_sampler_counts_each_image_once():
    for n, world in [(10, 3), (2, 4), (7, 1)]:
        shards = [list(ShardSampler(n, r, world)) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert sum(len(ShardSampler(n, r, world)) for r in range(world)) == n


def test_loader_reproducible_whatever_the_worker_count():
    cfg = dict(dataset="synthetic", input_size=12, synthetic=dict(train_size=24),
               augment=dict(crop="pad", padding=3, hflip=0.5, color_jitter=0.3))
    ds = build_dataset(cfg, "train")

    def epoch_batches(workers, epoch):
        loader = build_loader(ds, dict(cfg, workers=workers, persistent_workers=False), "train", 8, seed=5)
        loader.sampler.set_epoch(epoch)
        return torch.cat([x for x, _ in loader])

    a = epoch_batches(0, 1)
    assert a.dtype == torch.uint8 and a.shape == (24, 3, 12, 12)
    assert torch.equal(a, epoch_batches(2, 1))
    assert not torch.equal(a, epoch_batches(0, 2))
    with pytest.raises(DataError, match="fewer than one batch"):
        build_loader(ds, cfg, "train", 64)
    with pytest.raises(ConfigError, match="torch.distributed initialised"):
        build_loader(ds, cfg, "train", 8, distributed=True)


def test_device_transform_lighting_and_layout():
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    cfg = dict(dataset="synthetic", augment=dict(preset="cenet"), channels_last=True)
    t = build_device_transform(cfg, "train")
    torch.manual_seed(0)
    out = t(images)
    torch.manual_seed(0)
    alpha = torch.randn(4, 3) * 0.1
    cenet_vec = torch.tensor([[0.4009, 0.7192, -0.5675], [-0.8140, -0.0045, -0.5808], [0.4203, -0.6948, -0.5836]])
    expected = images.float() / 255
    for n in range(4):                   # CENet's ColorAugmentation: mm(eig_val * alpha, eig_vec), added per channel
        expected[n] += torch.mm(torch.tensor([PCA_EIGVAL]) * alpha[n:n + 1], cenet_vec).view(3, 1, 1)
    expected = (expected - torch.tensor([0.5] * 3).view(3, 1, 1)) / 0.5
    assert torch.allclose(out, expected, atol=1e-6) and out.is_contiguous(memory_format=torch.channels_last)
    assert build_device_transform(cfg, "val").lighting == 0.0
    with pytest.raises(DataError, match="uint8"):
        t(images.float())


def test_schema_is_documented_and_strict():
    def leaves(schema):
        for v in schema.values():
            yield from leaves(v) if isinstance(v, dict) else [v]
    assert all(isinstance(f, Field) and f.doc for f in leaves(DATA_SCHEMA))
    assert "batch_size" not in DATA_SCHEMA
    assert resolve({})["augment"]["preset"] == "auto"
    with pytest.raises(ConfigError, match="did you mean 'data.workers'"):
        resolve(dict(wokers=2))
    with pytest.raises(ConfigError, match=r"data.augment.scale must be a list \[low, high\]"):
        resolve(dict(augment=dict(scale=[1.0, 0.5])))
    with pytest.raises(ConfigError, match="data.dataset='imagenet' is not one of .*did you mean 'imagenet_list'"):
        resolve(dict(dataset="imagenet"))
    with pytest.raises(ConfigError, match="crop=pad is for in-memory datasets"):
        build_device_transform(dict(dataset="imagenet_folder", augment=dict(crop="pad")), "train")
