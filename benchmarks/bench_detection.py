"""Detection: our training step against torchvision's reference loop, and the loader's images/s per worker.

    python -m benchmarks.bench_detection [--config configs/detection/shapes_demo.yaml] [--batch 4]
        [--steps 1] [--rounds 16] [--batches 4] [--workers 1 2] [--loader-repeats 2] [--images 96]
        [--out benchmarks/results/detection_cpu.md]

Makes the generated shapes set (``data/shapes.py``) at the demo's image size in a temporary folder and
builds one :class:`engine.trainer.Trainer` from the detection config (one process, the demo's per-process
batch: global 8 over 2 processes = 4), then measures:

(a) **Training step.** ``--batches`` batches are read once from the Trainer's own training loader (the real
    ``data/coco.py`` pipeline) and kept; in each round, segments of ``--steps`` of them (the same batches for
    every loop of the round, the next ones in the next round) alternate, the order rotating each round, between

    - *reference*: the per-iteration body of torchvision's ``references/detection/engine.py``
      ``train_one_epoch`` (images and targets to the device, ``loss_dict = model(images, targets)``,
      ``losses = sum(...)``, ``reduce_dict`` for logging (the identity in one process), ``.item()`` and the
      finiteness check, ``optimizer.zero_grad(); losses.backward(); optimizer.step()``, the LinearLR warmup
      step, the MetricLogger updates), with its own SGD (momentum 0.9, weight decay as configured) over the
      model's trainable parameters; its images arrive as float [0, 1] tensors, as its loader makes them;
    - *engine*: ``Trainer._train_epoch`` as ``./train.sh`` runs it: the uint8 batch to the device, the
      device transform, ``DetectionTask.loss`` (the loss dict summed) under the configured autocast, the
      non-finite guard, backward, ``optimizer_step`` (gradient clipping as configured, SGD with the
      weight-decay groups, zero_grad, the LR scheduler, EMA if on), the on-device loss-component meters,
      timers, a log line per segment (the console muted, ``metrics.jsonl`` written), the stop poll;
    - *engine, no clipping*: the same with ``train.clip_grad_norm`` off (when the config clips; the
      reference does not), i.e. the reference's work.

    All train the same model in turn, so weight drift affects them alike; the first round is a warm-up.
    Each segment is timed by wall clock and by this process's CPU time (``--threads 1``). On a shared
    machine both swing by tens of percent from round to round (other jobs take the cores and caches): the
    default interleaves step by step (``--steps 1``; the engine's per-epoch work, under a millisecond, is
    then counted every step), and the report gives the median of the per-round ratios and the ratio of the
    fastest rounds (contention only ever adds time).

(b) **Loader.** The Trainer's training loader (``data.build_loader``: ``CocoDetection`` with the flip, the
    orientation-grouped batch sampler, the list collation) with 1, 2, ... workers, a warm-up epoch then
    timed epochs: images per wall second per worker and images per CPU-second of the worker processes,
    against the model's step rate from (a) in images/s, i.e. how many workers keep one process fed.
"""
import argparse
import collections
import datetime
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_data import measure_loader  # noqa: E402
from benchmarks.bench_loop_overhead import timed  # noqa: E402
from benchmarks.harness import write_report  # noqa: E402


class FixedLoader:
    """The same list of batches every epoch, in the shape the Trainer's loop expects of a loader."""

    class _Sampler:
        def set_epoch(self, epoch):
            pass

        def set_skip(self, n):
            pass

    def __init__(self, batches, batch_size):
        self.batches, self.batch_size, self.batch_sampler, self.sampler = batches, batch_size, None, self._Sampler()

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class _Smoothed:
    """torchvision's references/detection/utils.py SmoothedValue (window 20): what MetricLogger.update keeps."""

    def __init__(self):
        self.deque, self.total, self.count = collections.deque(maxlen=20), 0.0, 0

    def update(self, value):
        self.deque.append(value)
        self.count += 1
        self.total += value


class ReferenceLoop:
    """The per-iteration body of torchvision's detection reference ``train_one_epoch`` (single process)."""

    def __init__(self, model, cfg, device, warmup_iters):
        params = [p for p in model.parameters() if p.requires_grad]
        self.model, self.device, self.amp = model, device, cfg.train.amp
        self.optimizer = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                         weight_decay=cfg.train.weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LinearLR(self.optimizer, start_factor=1.0 / 1000,
                                                              total_iters=warmup_iters)
        self.meters = collections.defaultdict(_Smoothed)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == "fp16" else None

    def run(self, batches):
        from engine.evaluator import autocast_for
        self.model.train()
        end = time.time()
        for images, targets in batches:
            self.meters["data_time"].update(time.time() - end)
            images = list(image.to(self.device) for image in images)
            targets = [{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                       for t in targets]
            with autocast_for(self.device, self.amp):
                loss_dict = self.model(images, targets)
                losses = sum(loss for loss in loss_dict.values())
            loss_dict_reduced = loss_dict  # utils.reduce_dict: the identity when world_size < 2
            losses_reduced = sum(loss for loss in loss_dict_reduced.values())
            loss_value = losses_reduced.item()
            if not math.isfinite(loss_value):
                raise SystemExit(f"Loss is {loss_value}, stopping training")
            self.optimizer.zero_grad()
            if self.scaler is not None:
                self.scaler.scale(losses).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                losses.backward()
                self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            for k, v in dict(loss=losses_reduced, **loss_dict_reduced).items():
                self.meters[k].update(v.item())
            self.meters["lr"].update(self.optimizer.param_groups[0]["lr"])
            self.meters["iter_time"].update(time.time() - end)
            end = time.time()


def build(args, root, work_dir):
    from engine.config import load_config
    from engine.trainer import Trainer
    over = [f"data.root={root}", "data.workers=0", f"train.batch_size={args.batch}", "train.accum_steps=1",
            "eval.interval=0", "eval.final=false", f"runtime.device={args.device}", f"runtime.work_dir={work_dir}",
            "runtime.auto_resume=false", "runtime.tensorboard=false", f"train.epochs={args.rounds * 2 + 2}"]
    return Trainer(load_config(args.config, over + args.overrides))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/detection/shapes_demo.yaml")
    p.add_argument("--batch", type=int, default=4, help="images per step (the demo: 8 over 2 processes)")
    p.add_argument("--size", type=int, default=128, help="image size of the generated set (the demo's)")
    p.add_argument("--images", type=int, default=96, help="training images to generate (loader part)")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per segment")
    p.add_argument("--rounds", type=int, default=16, help="rounds of one segment per loop (the first is a warm-up)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches the rounds cycle through")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts (0 skips (b))")
    p.add_argument("--loader-epochs", type=int, default=1, help="timed epochs per loader measurement")
    p.add_argument("--loader-repeats", type=int, default=2, help="interleaved loader repeats (median)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--out", default=None, help="Markdown file for the results")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = p.parse_args(argv)
    import logging
    import warnings
    from data import build_loader
    from data.shapes import make_shapes_coco
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="bench_det_")
    try:
        root = os.path.join(tmp, "shapes")
        make_shapes_coco(root, {"train2017": args.images, "val2017": 2}, args.size)
        t = build(args, root, os.path.join(tmp, "work"))
        logging.getLogger("blocklab").setLevel(logging.WARNING)
        cfg = t.cfg
        pool = []
        for b in t.train_loader:
            pool.append(b)
            if len(pool) == max(args.batches, args.steps):
                break
        if len(pool) < args.steps:
            raise SystemExit(f"--images {args.images} gives {len(pool)} batches, fewer than --steps {args.steps}")
        real_loader = t.train_loader
        fixed = FixedLoader([], args.batch)
        t.train_loader, t.iters_per_epoch = fixed, args.steps
        t.total_steps = cfg.train.epochs * args.steps
        ref_pool = [([im.float().div(255) for im in images], targets) for images, targets in pool]

        def round_batches(r, which):
            return [which[(r * args.steps + k) % len(pool)] for k in range(args.steps)]
        ref = ReferenceLoop(t.model, cfg, t.device, warmup_iters=min(1000, len(real_loader) - 1))

        clip = cfg.train.clip_grad_norm

        def engine_segment(epoch, clip_grad_norm):
            cfg.train.clip_grad_norm = clip_grad_norm
            fixed.batches = round_batches(epoch // 2, pool)
            t.iter_in_epoch = 0
            t._train_epoch(epoch)

        loops = [("reference", lambda r: ref.run(round_batches(r, ref_pool))), ("engine", lambda r: engine_segment(2 * r, clip))]
        if clip:  # the reference does not clip: the engine without it does the reference's work
            loops.append(("engine, no clipping", lambda r: engine_segment(2 * r + 1, None)))
        res = {name: [] for name, _ in loops}  # (wall, cpu) seconds per step
        for r in range(args.rounds):
            order = loops[r % len(loops):] + loops[:r % len(loops)]  # rotate which goes first
            got = {}
            for name, fn in order:
                w, c = timed(lambda: fn(r))
                got[name] = (w / args.steps, c / args.steps)
                if r:
                    res[name].append(got[name])
            print(f"round {r}{' (warm-up)' if r == 0 else ''}: " + ", ".join(
                f"{n} {got[n][0] * 1e3:.0f} ms wall / {got[n][1] * 1e3:.0f} ms cpu per step"
                for n, _ in loops), flush=True)
        cfg.train.clip_grad_norm = clip
        t.runlog.close()
        t.stop.close()
        t.lock.release()

        loader_rows = {}
        train_set = t.train_set
        for rep in range(args.loader_repeats):
            for workers in [w for w in args.workers if w > 0]:
                images, wall, cpu = measure_loader(
                    lambda: build_loader(train_set, {**cfg.data, "workers": workers}, "train", args.batch, False,
                                         cfg.runtime.seed), args.loader_epochs)
                loader_rows.setdefault(workers, []).append((images / wall / workers, images / cpu))
                print(f"loader rep {rep} workers {workers}: {images / wall / workers:.1f} img/s/worker (wall), "
                      f"{images / cpu:.1f} img per worker CPU-s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()

    def summary(name, i):
        a, b = [x[i] for x in res["reference"]], [x[i] for x in res[name]]
        return statistics.median(b), statistics.median(y / x for x, y in zip(a, b)), b, min(b), min(b) / min(a)
    names = list(res)
    det = cfg.detector
    cmd = "python -m benchmarks.bench_detection " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# Detection training step and loader ({args.device})", "",
        f"Command: `{cmd.rstrip()}`", "",
        f"Date: {datetime.date.today()}; torch {torch.__version__}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s); load average {load0[0]:.1f} at start, "
        f"{load1[0]:.1f} at end (a machine shared with other jobs).",
        f"Model: `{args.config}`: {det.type} + FPN ({det.fpn_channels} channels) over `{cfg.model.backbone}`, "
        f"images {det.min_size}-{det.max_size}, {det.box_batch_size_per_image} RoIs/image, "
        f"{det.rpn_post_nms_top_n} proposals; batch {args.batch} from the generated shapes set at size "
        f"{args.size}; amp {cfg.train.amp}, clip_grad_norm {cfg.train.clip_grad_norm}. {args.steps} step(s) per "
        f"segment from {len(pool)} batches, {args.rounds - 1} measured rounds (after 1 warm-up), interleaved.", "",
        "## (a) Training step: ours against torchvision's reference loop", "",
        "| time | loop | median ms/step | vs reference | fastest ms/step | fastest vs reference | per round (ms/step) |",
        "|---|---|---:|---:|---:|---:|---|"]
    labels = {"reference": "torchvision reference (`train_one_epoch` body)",
              "engine": "blocklab engine (`Trainer._train_epoch`), as configured",
              "engine, no clipping": "blocklab engine, `clip_grad_norm` off (the reference's work)"}
    for label, i in (("CPU", 1), ("wall", 0)):
        for name in names:
            med, ratio, per, fastest, fastest_ratio = summary(name, i)
            lines.append(f"| {label} | {labels[name]} | {med * 1e3:.1f} | {ratio:.3f}x | {fastest * 1e3:.1f} | "
                         f"{fastest_ratio:.3f}x | {', '.join(f'{x * 1e3:.0f}' for x in per)} |")
    cpu = {name: summary(name, 1)[1] for name in names}
    fast = {name: summary(name, 1)[4] for name in names}
    lines += ["", "'vs reference': median of the per-round ratios (same round, same batches); 'fastest': the "
              "fastest round of each loop and their ratio. "
              f"**Engine / reference (CPU time): {cpu['engine']:.3f}x median, {fast['engine']:.3f}x fastest" + (
                  f"; without clipping: {cpu['engine, no clipping']:.3f}x median, "
                  f"{fast['engine, no clipping']:.3f}x fastest" if clip else "") + "**. Goal: <= 1.05x.", ""]
    model_img_s = args.batch / summary("engine", 1)[0]
    if loader_rows:
        lines += ["## (b) Loader images/s per worker against the model's step rate", "",
                  f"Model (engine step, CPU time, {torch.get_num_threads()} thread): **{model_img_s:.1f} img/s** "
                  f"per process.", "",
                  "| workers | img/s per worker (wall) | img per worker CPU-second | workers to feed one process |",
                  "|---|---:|---:|---:|"]
        for workers, runs in loader_rows.items():
            w_, c_ = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            lines.append(f"| {workers} | {w_:.0f} | {c_:.0f} | {model_img_s / c_:.2f} |")
        lines += ["", f"'workers to feed one process' = model img/s / loader img per worker CPU-second (median of "
                  f"{args.loader_repeats} repeats, {args.loader_epochs} timed epoch(s) of {len(train_set)} images "
                  "after a warm-up epoch): below 1, one worker per process keeps the model fed."]
    text = "\n".join(lines) + "\n"
    write_report(text, args.out)
    return {"cpu_ratio": cpu, "cpu_fastest_ratio": fast, "wall_ratio": {n: summary(n, 0)[1] for n in names},
            "model_img_s": model_img_s, "loader": loader_rows}


if __name__ == "__main__":
    main()
