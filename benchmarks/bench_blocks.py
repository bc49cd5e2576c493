"""Issue-2 block costs, side by side in one run on the same inputs.

    python -m benchmarks.bench_blocks --original /tmp/CENet --out benchmarks/results/blocks_cpu.md

(a) the CE module forward+backward against the original CENet module (patched in memory only
    enough to run on current PyTorch; pass its checkout with --original or $CENET_ROOT) at
    ResNet-50 shapes (benchmarks/bench_ce.py);
(b) a full training step (forward, cross-entropy, backward, SGD) of ResNet-50 against CE-, ED-,
    WE- and SE-ResNet-50, and (with --original) CE-ResNet-50 built with the original CE module;
(c) WE-ResNet-50 inference before and after ``fold_we`` against plain ResNet-50.
Models are timed interleaved, round after round, and each ratio is a ratio of medians of the
same rounds. Goals: CE module >= 2x the original; training step CE <= 1.15x, WE <= 1.10x plain;
folded WE inference 1.00x plain. The default input is 224x224, the size these ImageNet models
train at; --input-size / --batch change it (WE's extra work is per step, not per image, so its
ratio falls as the batch grows), --sections and --models pick what to run.
"""
import argparse
import copy
import os
import platform
import statistics
import sys

import torch

from benchmarks import bench_ce
from blocks.we import fold_we
from models import build_model
from benchmarks.harness import infer_step_fn, make_optimizer, synthetic_batch, train_step_fn

MODELS = {
    "resnet50": {"backbone": "resnet50"},
    "ce_resnet50": {"backbone": "resnet50", "plugins": [{"type": "ce", "stages": [1, 2, 3], "stem": True}]},
    "ed_resnet50": {"backbone": "resnet50", "plugins": [{"type": "ed", "position": "parallel"}]},
    "we_resnet50": {"backbone": "resnet50", "conv": {"type": "we"}},
    "se_resnet50": {"backbone": "resnet50", "plugins": [{"type": "se"}]},
}


def with_original_ce(model, orig_cls):
    """``model`` with every blocklab CE replaced by the original CENet module (same size, groups, weights)."""
    from blocks.ce import CE
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CE):
                orig = orig_cls(child.channels, num_channels=child.group_channels)
                bench_ce.copy_weights(orig, child)  # the same initial weights in both
                setattr(parent, name, orig)
    return model


def interleaved(steps, x, y, rounds, warmup=2):
    """Median seconds per step of each callable, timed one after another in every round."""
    import time
    for step in steps.values():
        for _ in range(warmup):
            step(x, y)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            step(x, y)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def ratio_table(medians, base="resnet50", goals=None):
    goals = goals or {}
    rows = ["| model | ms / step | vs plain ResNet-50 | goal |", "|---|---:|---:|---|"]
    for name, t in medians.items():
        rows.append(f"| {name} | {t * 1e3:.1f} | {t / medians[base]:.2f}x | {goals.get(name, '')} |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--original", default=os.environ.get("CENET_ROOT"), help="CENet checkout for (a)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--sections", default="abc", help="which of (a), (b), (c) to run, e.g. 'b'")
    ap.add_argument("--models", help="comma-separated subset of the (b) models (resnet50 always runs)")
    ap.add_argument("--channels-last", action="store_true", help="(b) in channels_last (models and batch)")
    ap.add_argument("--out", help="write the tables here (markdown)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    sections = [f"Command: `python -m benchmarks.bench_blocks {' '.join(argv if argv is not None else sys.argv[1:])}`",
                f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), batch {args.batch}, "
                f"load average {load:.1f} on {os.cpu_count()} cores at start; medians of {args.rounds} interleaved rounds."]

    orig_cls = bench_ce.load_original(args.original) if args.original else None
    if orig_cls is None:
        print("original CENet not given (git clone https://github.com/Tangshitao/CENet; --original PATH): ours only")
    if "a" in args.sections:
        print("(a) CE module vs the original CENet module")
        head = ("| shape | ours train f+b ms | original train f+b ms | speed-up | ours eval ms | original eval ms "
                "| speed-up |\n|---|---|---|---|---|---|---|")
        print(head)
        sections.append("### (a) CE module vs the original (goal: >= 2x)\n\n" + head + "\n"
                        + "\n".join(bench_ce.table(orig_cls, args.batch, args.rounds)))

    torch.manual_seed(0)
    x, y = synthetic_batch(args.batch, args.input_size, 1000, device, False)
    if "b" in args.sections:
        print(f"\n(b) training step at {args.input_size}x{args.input_size}")
        names = ["resnet50"] + [n for n in (args.models.split(",") if args.models else MODELS) if n != "resnet50"]
        unknown = sorted(set(names) - set(MODELS) - {"ce_resnet50_original"})
        if unknown:
            ap.error(f"unknown --models {unknown}; choose from {sorted(MODELS)} or ce_resnet50_original")
        if "ce_resnet50_original" in names and orig_cls is None:
            ap.error("ce_resnet50_original needs --original PATH (a CENet checkout)")
        if orig_cls is not None and not args.models and "ce_resnet50" in names:
            names.insert(names.index("ce_resnet50") + 1, "ce_resnet50_original")
        train, layout = {}, torch.channels_last if args.channels_last else torch.contiguous_format
        for name in names:
            if name == "ce_resnet50_original":
                model = with_original_ce(build_model(MODELS["ce_resnet50"]), orig_cls)
            else:
                model = build_model(MODELS[name])
            model.to(memory_format=layout)
            train[name] = train_step_fn(model, make_optimizer(model, args.batch), device, "fp32")
        xb = x.contiguous(memory_format=layout)
        table_b = ratio_table(interleaved(train, xb, y, args.rounds),
                              goals={"ce_resnet50": "<= 1.15x", "we_resnet50": "<= 1.10x"})
        print(table_b)
        sections.append(f"### (b) training step, ResNet-50 family, batch {args.batch} at "
                        f"{args.input_size}x{args.input_size}{', channels_last' if args.channels_last else ''}"
                        "\n\n" + table_b)
        del train
    if "c" not in args.sections:
        return _write(args.out, sections)

    print("\n(c) WE-ResNet-50 inference before and after fold()")
    plain = build_model(MODELS["resnet50"]).eval()
    we = build_model(MODELS["we_resnet50"]).eval()
    folded = fold_we(copy.deepcopy(we)).eval()
    with torch.no_grad():
        err = ((folded(x) - we(x)).abs().max() / we(x).abs().max()).item()
    infer = {"resnet50": infer_step_fn(plain, device, "fp32"), "we_resnet50": infer_step_fn(we, device, "fp32"),
             "we_resnet50 folded": infer_step_fn(folded, device, "fp32")}
    rounds_c = 3 * args.rounds  # inference steps are short: more rounds for the same noise
    table_c = ratio_table(interleaved(infer, x, y, rounds_c), goals={"we_resnet50 folded": "1.00x"})
    table_c += f"\n\nfolded vs unfolded outputs: max relative difference {err:.1e}"
    print(table_c)
    sections.append(f"### (c) WE-ResNet-50 inference, folded (batch {args.batch}, {rounds_c} rounds)\n\n" + table_c)
    return _write(args.out, sections)


def _write(path, sections):
    if path:
        with open(path, "w") as f:
            f.write("# Block costs on CPU (issue 2)\n\n" + "\n\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
