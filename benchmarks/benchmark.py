"""Training and inference speed of models on synthetic data made on the device.

    python -m benchmarks.benchmark --suite resnet50-family --precision bf16 --channels-last [--compile [both]]
    python -m benchmarks.benchmark --config configs/imagenet/cenet/ce_resnet50.yaml --config ... --mode train
    python -m benchmarks.benchmark --model-json '{"backbone": "cifar_resnet20", "num_classes": 10}' --input-size 32
    python -m benchmarks.benchmark --suite resnet50-family --check          # bf16-vs-fp32, channels_last, NaN
    python -m benchmarks.benchmark --suite resnet50-family --graph-breaks   # torch._dynamo.explain per model

A training step is zero_grad(set_to_none) + forward + cross-entropy + backward + SGD step
(momentum 0.9, wd 1e-4); an inference step is an eval-mode forward under no_grad. Models are
timed interleaved (``--repeats`` rounds of ``--steps`` steps each, after ``--warmup``), and
the tables report the median step: throughput = batch / median step time. MFU = model FLOPs /
step time / the card's datasheet peak at the precision. Model FLOPs are what the step executes,
counted by ``torch.utils.flop_counter`` at the input size: for inference 2 x the eval-mode forward
MACs of the batch (``tools.flops.complexity``; WE folded: in eval WEConv2d caches its excited
weight, so inference runs no excitation); for training the train-mode forward + backward of the unfolded model
(``harness.train_step_flops``: CE's Gram/Newton statistics and gradients, WE's excitation and
its backward once per step), not 3 x the forward. Peak memory is what the model's steps need beyond what other resident models hold.
"""
import argparse
import copy
import json
import os
import shlex
import sys

import torch

from benchmarks import harness as bu

# Suites: name -> {row name: model section, or "torchvision:<name>" for the torchvision reference}.
# The resnet50-family sections are the model sections of configs/imagenet/{cenet,ednet,we,mobilenet}.
CE_R50 = {"type": "ce", "position": "after_norm", "stages": [1, 2, 3], "stem": True, "group_channels": 16,
          "newton_iters": 3}
SUITES = {
    "resnet50-family": {
        "tv_resnet50": "torchvision:resnet50",
        "resnet50": {"backbone": "resnet50"},
        "ce_resnet50": {"backbone": "resnet50", "plugins": [CE_R50]},
        "ed_resnet50": {"backbone": "resnet50",
                        "plugins": [{"type": "ed", "position": "parallel", "groups": 32, "reduction": 4}]},
        "we_resnet50": {"backbone": "resnet50", "conv": {"type": "we", "lwe": True, "mwe": True, "ws": False}},
        "se_resnet50": {"backbone": "resnet50", "plugins": [{"type": "se", "reduction": 16}]},
        "resnext50_32x4d": {"backbone": "resnext50_32x4d"},
        "mobilenet_v2": {"backbone": "mobilenet_v2"},
        "ce_mobilenet_v2": {"backbone": "mobilenet_v2", "plugins": [{"type": "ce", "stem": True,
                                                                      "group_channels": 16,
                                                                      "stem_group_channels": 32}]},
    },
    # every block on a CIFAR ResNet-20 and CE on a narrow MobileNetV2: for tests and --check on CPU
    # (ED groups fit 16 channels; at 32x32 input MobileNetV2's stages 6-7 run CE on 1x1 maps)
    "tiny": {
        "cifar_resnet20": {"backbone": "cifar_resnet20", "num_classes": 10},
        "ce_cifar_resnet20": {"backbone": "cifar_resnet20", "num_classes": 10,
                              "plugins": [{"type": "ce", "stem": True}]},
        "ed_cifar_resnet20": {"backbone": "cifar_resnet20", "num_classes": 10,
                              "plugins": [{"type": "ed", "groups": 4}]},
        "we_cifar_resnet20": {"backbone": "cifar_resnet20", "num_classes": 10, "conv": {"type": "we"}},
        "se_cifar_resnet20": {"backbone": "cifar_resnet20", "num_classes": 10, "plugins": [{"type": "se"}]},
        "ce_mobilenet_v2_x0.5": {"backbone": "mobilenet_v2", "num_classes": 10,
                                 "backbone_args": {"width_mult": 0.5},
                                 "plugins": [{"type": "ce", "stem": True}]},
    },
}
BASELINES = ("resnet50", "cifar_resnet20")


class Entry:
    """One model to benchmark: its name, model section and (once built) the module."""

    def __init__(self, name, spec, input_size=None):
        self.name, self.spec, self.input_size = name, spec, input_size
        self.model = self.error = self.gmacs = self.step_gmacs = self.train_flops = self.params = None
        self.infer_only = False  # a folded WE copy: nothing to train

    @property
    def num_classes(self):
        return 1000 if isinstance(self.spec, str) else int(self.spec.get("num_classes", 1000))

    def build(self):
        import torchvision
        from models import build_model
        if isinstance(self.spec, str):
            return getattr(torchvision.models, self.spec.split(":", 1)[1])()
        return build_model(self.spec)


def entries_from_args(args):
    """The models named by --suite/--models, --config and --model-json, in that order."""
    entries = []
    if args.suite:
        suite = SUITES[args.suite]
        names = args.models.split(",") if args.models else list(suite)
        unknown = [n for n in names if n not in suite]
        if unknown:
            raise SystemExit(f"--models: {unknown} not in suite '{args.suite}'; it has {', '.join(suite)}")
        entries += [Entry(n, copy.deepcopy(suite[n])) for n in names]
    for path in args.config or ():
        from engine.config import load_config
        cfg = load_config(path, args.override or ())
        model = json.loads(json.dumps(cfg.model))  # plain dicts
        size = cfg.get("data", {}).get("input_size")
        entries.append(Entry(os.path.splitext(os.path.basename(path))[0], model, size))
    for i, text in enumerate(args.model_json or ()):
        spec = json.loads(text)
        entries.append(Entry(spec.pop("name", f"{spec.get('backbone', 'model')}_{i}"), spec))
    if not entries:
        raise SystemExit("nothing to run: give --suite, --config or --model-json")
    return entries


def prepare(entries, args, device):
    """Build each model on the CPU, count its FLOPs there, then move it to the device."""
    ready = []
    for e in entries:
        e.input_size = args.input_size or e.input_size or 224
        try:
            torch.manual_seed(0)
            built = [(e, e.build())]
            if args.fold_we and args.mode != "train" and bu.is_we(built[0][1]):
                from blocks.we import fold_we
                folded = Entry(e.name + "+fold", e.spec, e.input_size)
                folded.infer_only = True
                built.append((folded, fold_we(copy.deepcopy(built[0][1]))))
            for entry, cpu_model in built:
                entry.params = sum(p.numel() for p in cpu_model.parameters())
                if not (args.check or args.graph_breaks):  # FLOPs are not needed there
                    entry.gmacs, entry.step_gmacs = bu.forward_gmacs(cpu_model, e.input_size, args.batch_size)
                    if args.mode != "infer" and not entry.infer_only:
                        entry.train_flops = bu.train_step_flops(cpu_model, e.input_size, args.batch_size)
                entry.model = cpu_model.to(device)
                if args.channels_last:
                    entry.model = entry.model.to(memory_format=torch.channels_last)
        except Exception as exc:  # report and go on with the other models
            msg = str(exc).strip()
            e.error = f"{type(exc).__name__}: {msg.splitlines()[0] if msg else ''}"
            print(f"[{e.name}] not built: {e.error}", file=sys.stderr)
            continue
        ready += [entry for entry, _ in built]
    return ready


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_argument_group("models")
    src.add_argument("--suite", choices=sorted(SUITES), help="a named list of models")
    src.add_argument("--models", help="comma-separated subset of the suite")
    src.add_argument("--config", action="append", help="YAML config (repeatable); its model section")
    src.add_argument("--override", action="append", help="key=value override for every --config")
    src.add_argument("--model-json", action="append", help="a model section as JSON (repeatable; 'name' key optional)")
    p.add_argument("--mode", choices=("train", "infer", "both"), default="both")
    p.add_argument("--precision", choices=bu.PRECISIONS, default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                   help="torch.compile each model; 'both' times it eager and compiled in the same run")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    p.add_argument("--fold-we", action="store_true", help="also time WE models folded into plain convs (infer)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, help="default: the config's data.input_size, else 224")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds over all models")
    p.add_argument("--baseline", default=None, help="row the ratios refer to (default: plain resnet50 / first)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU when the card is not in the table")
    p.add_argument("--json", help="write results, device, versions and settings here")
    p.add_argument("--markdown", help="write the table (with the command) here")
    p.add_argument("--seed", type=int, default=0)
    chk = p.add_argument_group("checks (instead of timing)")
    chk.add_argument("--check", action="store_true", help="bf16/fp16-vs-fp32, channels_last, WE fold, NaN-free steps")
    chk.add_argument("--check-steps", type=int, default=None, help="training steps of --check (default 200 GPU, 5 CPU)")
    chk.add_argument("--graph-breaks", action="store_true", help="list torch._dynamo graph breaks per model")
    args = p.parse_args(argv)
    args.compile_choice = args.compile
    args.compile_variants = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    args.compile = args.compile != "off"  # --check / --graph-breaks: compile (and compare) when set
    if args.baseline is None:
        args.baseline = next((b for b in BASELINES if args.suite and b in SUITES[args.suite]), None)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bu.set_precision(args.precision, device)
    entries = entries_from_args(args)
    command = "python -m benchmarks.benchmark " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report = {"command": command, "device": bu.device_info(device), "versions": bu.versions(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
              "peak_flops": args.peak_tflops * 1e12 if args.peak_tflops else bu.peak_flops(device, args.precision)}
    if args.check or args.graph_breaks:
        from benchmarks import checks
        ready = prepare(entries, argparse.Namespace(**{**vars(args), "fold_we": False, "channels_last": False}), device)
        report["check" if args.check else "graph_breaks"] = rows = \
            (checks.run_checks if args.check else checks.graph_breaks)(ready, args, device)
        text = (checks.check_table if args.check else checks.breaks_table)(rows)
        failed = any(not r.get("ok", True) for r in rows) or any(e.error for e in entries)
    else:
        rows = bu.time_models(prepare(entries, args, device), args, device)
        rows += [{"model": e.name, "mode": args.mode, "params_m": None, "gmacs": None, "error": e.error}
                 for e in entries if e.error]
        report["results"] = rows
        text = bu.results_table(rows)
        failed = any("error" in r for r in rows)
    dev = report["device"]
    header = (f"`{command}`\n\ndevice: {dev['name']} ({dev['type']}, {dev['threads']} threads); torch "
              f"{report['versions']['torch']}; precision {args.precision}, channels_last {args.channels_last}, "
              f"compile {args.compile_choice}, batch {args.batch_size}, input {args.input_size or 'config/224'}\n")
    print(header)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(header + "\n" + text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
