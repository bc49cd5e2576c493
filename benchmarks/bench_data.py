"""Training input pipeline throughput: torchvision's reference vs blocklab's, side by side.

Makes a few hundred ImageNet-like JPEGs (about 500x375, quality 90, cut from the real
photographs scikit-learn ships, with random scale, colour and noise) in a class-folder
tree, then measures the training pipeline through a DataLoader at 1 and 2 workers:

- reference: ImageFolder + RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize
- blocklab PIL path (data.fast_decode=false): same PIL decode and resize, uint8 out
  (ToTensor/Normalize move to the device)
- blocklab (default): crop sampled on header size, reduced-DCT / torchvision.io decode,
  uint8 antialiased resize, uint8 out

Per-worker throughput is reported two ways: wall-clock images/s divided by the worker
count, and images per CPU-second of the worker processes (robust when other jobs share
the cores). It also checks that the crop-scale/aspect-ratio distribution is unchanged.

    python -m benchmarks.bench_data --out benchmarks/results/data_cpu.md
"""
import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import build_dataset, build_loader  # noqa: E402
from data.decode import jpeg_size  # noqa: E402
from data.transforms import sample_resized_crop  # noqa: E402
from benchmarks.harness import write_report  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_images(root, n, classes=10, seed=0):
    """n JPEGs of 500x375 (or 375x500) in root/train/<class>/, cut from scikit-learn's sample photos."""
    from sklearn.datasets import load_sample_images
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    for i in range(n):
        src = photos[i % len(photos)]
        w0, h0 = src.size
        s = rng.uniform(0.45, 1.0)
        cw, ch = int(w0 * s), int(h0 * s)
        x, y = int(rng.integers(0, w0 - cw + 1)), int(rng.integers(0, h0 - ch + 1))
        size = (500, 375) if rng.random() < 0.75 else (375, 500)
        img = src.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
        a = np.asarray(img, dtype=np.float32) * rng.uniform(0.7, 1.2, 3) + rng.normal(0, 4, (size[1], size[0], 3))
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        folder = os.path.join(root, "train", f"c{i % classes:03d}")
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f"{i:05d}.JPEG"), quality=90)


def _cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


class _Reference(torch.utils.data.Dataset):
    def __init__(self, root):
        self.inner = torchvision.datasets.ImageFolder(os.path.join(root, "train"), transform=T.Compose([
            T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]))

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


def _loaders(root, workers, batch):
    """name -> (dataset, loader factory); every loader reshuffles, keeps its workers, drops the last batch."""
    ref = _Reference(root)
    cfg = dict(dataset="imagenet_folder", root=root, workers=workers, pin_memory=False, persistent_workers=True)
    ours_pil = build_dataset(dict(cfg, fast_decode=False), "train")
    ours = build_dataset(cfg, "train")
    kw = dict(batch_size=batch, num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    return {
        "torchvision reference": (ref, lambda: torch.utils.data.DataLoader(ref, shuffle=True, **kw)),
        "blocklab, PIL path (fast_decode=false)": (ours_pil, lambda: build_loader(ours_pil, dict(cfg, fast_decode=False),
                                                                                "train", batch, seed=0)),
        "blocklab (default)": (ours, lambda: build_loader(ours, cfg, "train", batch, seed=0)),
    }


def measure_loader(make_loader, epochs):
    """Warm-up epoch, then `epochs` timed epochs: (images, wall seconds, worker CPU seconds)."""
    loader = make_loader()
    sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)  # inside a (grouped) batch sampler
    it = iter(loader)
    for _ in it:
        pass
    pids = [w.pid for w in getattr(it, "_workers", [])]
    cpu0 = _cpu_seconds(pids) if pids else time.process_time()
    t0, images = time.perf_counter(), 0
    for epoch in range(1, epochs + 1):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for x, _ in loader:
            images += len(x)  # a tensor, or detection's list of images
    wall = time.perf_counter() - t0
    cpu = (_cpu_seconds(pids) if pids else time.process_time()) - cpu0
    del it, loader
    return images, wall, cpu


def measure_inline(dataset, n):
    """Single process, one thread: CPU ms per image of the per-sample transform alone."""
    t0 = time.process_time()
    for k in range(n):
        dataset[(k % len(dataset), k)] if not isinstance(dataset, _Reference) else dataset[k % len(dataset)]
    return (time.process_time() - t0) / n * 1e3


def _ks(a, b):
    """Two-sample Kolmogorov-Smirnov statistic and asymptotic p-value."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)).max()
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (en + 0.12 + 0.11 / en) * d
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, min(max(p, 0.0), 1.0)


def crop_statistics(root, n=20000):
    """Same sampler as torchvision? Identity under equal seeds, KS test under independent seeds."""
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    fake = Image.new("RGB", (500, 375))
    same = 0
    for k in range(2000):
        torch.manual_seed(k)
        same += tuple(T.RandomResizedCrop.get_params(fake, scale, ratio)) == \
            sample_resized_crop(375, 500, scale, ratio, torch.Generator().manual_seed(k))
    torch.manual_seed(12345)
    ref = np.array([T.RandomResizedCrop.get_params(fake, scale, ratio) for _ in range(n)], dtype=np.float64)
    g = torch.Generator().manual_seed(54321)
    ours = np.array([sample_resized_crop(375, 500, scale, ratio, g) for _ in range(n)], dtype=np.float64)
    rows = []
    for name, f in [("area fraction", lambda p: p[:, 2] * p[:, 3] / (375 * 500)),
                    ("log aspect ratio w/h", lambda p: np.log(p[:, 3] / p[:, 2]))]:
        a, b = f(ref), f(ours)
        d, p = _ks(a, b)
        rows.append(f"| {name} | {a.mean():.4f} / {b.mean():.4f} | {np.median(a):.4f} / {np.median(b):.4f} | "
                    f"{d:.4f} | {p:.2f} |")
    headers = 0
    for dirpath, _, files in os.walk(os.path.join(root, "train")):
        for fname in files:
            path = os.path.join(dirpath, fname)
            with open(path, "rb") as fh:
                headers += jpeg_size(fh.read()) == Image.open(path).size
    return same, rows, headers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=320, help="number of JPEGs to make")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per measurement (after a warm-up one)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    ap.add_argument("--out", help="write the markdown report here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    root = tempfile.mkdtemp(prefix="bench_data_")
    try:
        make_images(root, args.images)
        nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        results = {}
        for rep in range(args.repeats):
            for workers in args.workers:
                for name, (_, make) in _loaders(root, workers, args.batch).items():
                    images, wall, cpu = measure_loader(make, args.epochs)
                    results.setdefault((name, workers), []).append((images / wall / workers, images / cpu))
                    print(f"rep {rep} workers {workers} {name}: {images / wall / workers:.1f} img/s/worker, "
                          f"{images / cpu:.1f} img/CPU-s", file=sys.stderr)
        inline = {}
        for _ in range(args.repeats):
            for name, (ds, _) in _loaders(root, 0, args.batch).items():
                inline.setdefault(name, []).append(measure_inline(ds, 200))
        inline = {name: np.median(v) for name, v in inline.items()}
        same, crop_rows, headers = crop_statistics(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load1 = os.getloadavg()

    ref_name = "torchvision reference"
    lines = [
        "# Data pipeline throughput (CPU)",
        "",
        f"Command: `python -m benchmarks.bench_data {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Pillow {Image.__version__}; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end.",
        "",
        f"Data: {args.images} JPEGs, 500x375 or 375x500, quality 90, {nbytes / args.images / 1024:.0f} KiB average, "
        f"cut from scikit-learn's sample photographs; batch {args.batch}, {args.epochs} timed epochs after a "
        f"warm-up epoch, median of {args.repeats} interleaved repeats. Output 224x224; blocklab's batches are uint8 "
        f"(normalisation runs on the device), the reference's float32 normalised.",
        "",
        "Wall-clock figures depend on the other jobs sharing the cores (see the load average); the CPU-second "
        "column counts only the time the worker processes ran, and each ratio pairs runs of the same repeat.",
        "",
        "| pipeline | workers | img/s per worker (wall) | img per worker CPU-second | vs reference (CPU-s, paired) |",
        "|---|---|---|---|---|",
    ]
    for workers in args.workers:
        ref = results[(ref_name, workers)]
        for name in (ref_name, "blocklab, PIL path (fast_decode=false)", "blocklab (default)"):
            runs = results[(name, workers)]
            wall, cpu = np.median([w for w, _ in runs]), np.median([c for _, c in runs])
            ratio = np.median([c / rc for (_, c), (_, rc) in zip(runs, ref)])   # paired: same repeat
            lines.append(f"| {name} | {workers} | {wall:.0f} | {cpu:.0f} | {ratio:.2f}x |")
    lines += ["", "Per-sample transform alone, one process, one thread (CPU ms per image):", "",
              "| pipeline | ms/image | vs reference |", "|---|---|---|"]
    for name, ms in inline.items():
        lines.append(f"| {name} | {ms:.2f} | {inline[ref_name] / ms:.2f}x |")
    lines += ["", "Crop distribution (RandomResizedCrop scale (0.08, 1), ratio (3/4, 4/3) on 500x375):", "",
              f"- identical parameters to torchvision's `get_params` under equal seeds: {same}/2000",
              f"- JPEG header size equals PIL's size (the size the crop is sampled on): {headers}/{args.images}",
              "- independent streams, 20000 crops each (reference / blocklab), two-sample KS test:", "",
              "| quantity | mean | median | KS D | p-value |", "|---|---|---|---|---|"] + crop_rows
    report = "\n".join(lines) + "\n"
    write_report(report, args.out)


if __name__ == "__main__":
    main()
