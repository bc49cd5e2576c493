"""Per-step overhead of the training loop itself, against a bare loop on the same model, same run.

    python -m benchmarks.bench_loop_overhead [--config configs/default.yaml] [--steps 20] [--rounds 7]
        [--batch 64] [--size 32] [--device cpu] [--out benchmarks/results/loop_overhead_cpu.md]

One :class:`engine.trainer.Trainer` is built from the config with a synthetic
dataset of exactly ``steps`` batches, then segments of ``steps`` optimizer steps
alternate: the bare loop (copy, device transform, forward, loss, backward, SGD
step, zero_grad, LR step) and ``Trainer._train_epoch`` (the same work plus
on-device meters, host timers, logging every ``runtime.log_interval`` steps,
the stop poll and the checkpoint-cadence checks; no checkpoint is written).
Alternating in one process on the same model, optimizer and loader cancels
slow drifts; the first round is a warm-up and is dropped. Each segment is timed
by wall clock and by this process's CPU time (``time.process_time``, with
``--threads 1`` by default): on a shared machine other processes inflate wall
times by whole factors but hardly this process's CPU time, so the CPU-time ratio
is the robust measure of the work the loop adds; on a quiet machine both agree.
"""
import argparse
import datetime
import itertools
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.harness import write_report  # noqa: E402


def build(args):
    from engine.config import load_config
    from engine.trainer import Trainer
    over = ["data.dataset=synthetic", "data.root=null", "data.num_classes=null", f"data.input_size={args.size}",
            "data.workers=0", f"data.synthetic.train_size={args.steps * args.batch}", "data.synthetic.val_size=2",
            "data.synthetic.num_classes=null", f"train.batch_size={args.batch}", "train.accum_steps=1",
            f"train.epochs={args.rounds * 2 + 2}", "train.warmup_epochs=0", "eval.interval=0", "eval.final=false",
            f"runtime.device={args.device}", f"runtime.work_dir={args.work_dir}", "runtime.auto_resume=false",
            f"runtime.log_interval={args.log_interval}", "runtime.tensorboard=true"]
    return Trainer(load_config(args.config, over + args.overrides))


def timed(fn):
    """(wall seconds, CPU seconds) of ``fn()``, device work included."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    w, c = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - w, time.process_time() - c


def bare_segment(t, epoch):
    """The minimal loop on the trainer's own objects."""
    loader = t.train_loader
    loader.sampler.set_epoch(epoch) if hasattr(loader.sampler, "set_epoch") else None
    t.net.train()
    for images, target in itertools.islice(loader, t.iters_per_epoch):
        images = images.to(t.device, non_blocking=True)
        target = target.to(t.device, non_blocking=True)
        loss = t.criterion(t.net(t.train_tf(images)), target)
        loss.backward()
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.scheduler.step()


def engine_segment(t, epoch):
    t.iter_in_epoch = 0
    t._train_epoch(epoch)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per segment")
    p.add_argument("--rounds", type=int, default=7, help="bare/engine pairs (the first is a warm-up)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--work-dir", default="/tmp/blocklab_bench_loop")
    p.add_argument("--out", default=None, help="Markdown file for the results")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    import logging
    if args.threads:
        torch.set_num_threads(args.threads)
    t = build(args)
    logging.getLogger("blocklab").setLevel(logging.WARNING)
    res = {"bare": [], "engine": []}  # (wall, cpu) seconds per step
    for r in range(args.rounds):
        pair = [("bare", bare_segment), ("engine", engine_segment)]
        if r % 2:
            pair.reverse()  # alternate which goes first
        got = {}
        for name, fn in pair:
            w, c = timed(lambda: fn(t, 2 * r + (name == "engine")))
            got[name] = (w / t.iters_per_epoch, c / t.iters_per_epoch)
            if r:
                res[name].append(got[name])
        print(f"round {r}{' (warm-up)' if r == 0 else ''}: " + ", ".join(
            f"{n} {got[n][0] * 1e3:.1f} ms wall / {got[n][1] * 1e3:.1f} ms cpu per step" for n in ("bare", "engine")),
            flush=True)
    t.runlog.close()
    t.stop.close()

    def summary(i):
        b, e = [x[i] for x in res["bare"]], [x[i] for x in res["engine"]]
        return (statistics.median(b), statistics.median(e), statistics.median(y / x - 1 for x, y in zip(b, e)),
                sum(e) / sum(b) - 1, b, e)
    wall, cpu = summary(0), summary(1)
    cmd = "python -m benchmarks.bench_loop_overhead " + " ".join(sys.argv[1:] if argv is None else argv)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    lines = [
        f"# Training-loop overhead ({args.device})", "",
        f"Command: `{cmd}`", "",
        f"Date: {datetime.date.today()}; torch {torch.__version__}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s); load average {load[0]:.1f} "
        f"(a machine shared with other jobs).",
        f"Model: `{t.cfg.model.backbone}` + {[pl['type'] for pl in t.cfg.model.plugins]}, batch {args.batch}, "
        f"{args.size}x{args.size}, {args.steps} steps per segment, {args.rounds - 1} measured rounds "
        f"(after 1 warm-up), log every {args.log_interval} steps (console + tensorboardX + jsonl).", "",
        "| time | loop | median ms/step | per round (ms/step) |", "|---|---|---:|---|"]
    for label, (mb, me, _, _, b, e) in (("CPU", cpu), ("wall", wall)):
        lines.append(f"| {label} | bare (forward, backward, SGD, LR step) | {mb * 1e3:.2f} | "
                     f"{', '.join(f'{x * 1e3:.1f}' for x in b)} |")
        lines.append(f"| {label} | engine (`Trainer._train_epoch`) | {me * 1e3:.2f} | "
                     f"{', '.join(f'{x * 1e3:.1f}' for x in e)} |")
    lines += [
        "",
        f"**Overhead (CPU time): {cpu[2] * 100:+.2f}%** (median of per-round ratios; {cpu[3] * 100:+.2f}% ratio "
        f"of sums). Wall time: {wall[2] * 100:+.2f}% (median of per-round ratios; {wall[3] * 100:+.2f}% ratio of "
        "sums), noisy on a shared machine. Goal: < 3%.", "",
        "What the engine adds per step: on-device top-1/top-5/loss sums (no host sync), host timers, "
        "the modulo checks for logging and step checkpoints, and the stop-flag poll (a no-op in one process; an "
        "async gloo all-reduce when distributed). At each log step it syncs once (one all-reduce + `.tolist()`) and "
        "writes a console line, a JSON line and tensorboard scalars.",
    ]
    text = "\n".join(lines) + "\n"
    write_report(text, args.out)


if __name__ == "__main__":
    main()
