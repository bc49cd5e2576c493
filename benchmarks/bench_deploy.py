"""Inference time per image on CPU: eager eval vs the inference form (folded) vs exported files.

    python -m benchmarks.bench_deploy --threads 1 --batch 2 --input-size 224 --out benchmarks/results/deploy_cpu.md

For plain ResNet-50 and CE-, ED-, WE-, SE- (and ED-SE-) ResNet-50: the eval-mode model (eager), its
inference form (``models.inference.to_inference``: WE folded, conv+BN folded, CE's BD as a grouped
1x1 conv), and the inference form exported the way ``tools.deploy`` does it and loaded back:
ONNX run by onnxruntime (legacy exporter), torch.export's .pt2 (``torch.export.load(...).module()``)
and TorchScript (torch.jit.trace). The forms of one model are timed interleaved, round after round,
so their ratios are side by side; each figure is a median. Every form's outputs are compared
with eager eval on the timed batch (max relative error in the table).
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch

from models import build_model
from models.inference import relative_error, to_inference

MODELS = {
    "resnet50": {"backbone": "resnet50"},
    "ce_resnet50": {"backbone": "resnet50", "plugins": [{"type": "ce", "stages": [1, 2, 3], "stem": True}]},
    "ed_resnet50": {"backbone": "resnet50", "plugins": [{"type": "ed", "position": "parallel"}]},
    "we_resnet50": {"backbone": "resnet50", "conv": {"type": "we", "lwe": True, "mwe": True}},
    "se_resnet50": {"backbone": "resnet50", "plugins": [{"type": "se"}]},
    "ed_se_resnet50": {"backbone": "resnet50", "plugins": [{"type": "se"}, {"type": "ed", "position": "parallel"}]},
}
EXPORTERS = ("onnxruntime", "torch.export", "torchscript")


def exported(model, x, which, threads):
    """A callable running ``model`` exported as ``which`` and loaded back with its runtime."""
    from models.export import export_bytes, runner
    fmt = {"onnxruntime": "onnx", "torch.export": "export", "torchscript": "torchscript"}[which]
    data = export_bytes(model, x, fmt)
    if fmt != "onnx":
        run = runner(data, fmt)
        return lambda z: run(z)
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda z: torch.from_numpy(session.run(None, {name: z.numpy()})[0])


def interleaved(fns, x, rounds, warmup=2):
    """Median seconds per call of each callable, timed one after another in every round."""
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--exporters", default=",".join(EXPORTERS), help=f"comma-separated subset of {', '.join(EXPORTERS)}")
    ap.add_argument("--out", help="write the table here (markdown)")
    args = ap.parse_args(argv)
    names, exporters = args.models.split(","), args.exporters.split(",")
    bad = sorted(set(names) - set(MODELS)) + sorted(set(exporters) - set(EXPORTERS))
    if bad:
        ap.error(f"unknown --models/--exporters {bad}; models: {', '.join(MODELS)}; exporters: {', '.join(EXPORTERS)}")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    versions = f"torch {torch.__version__}"
    if "onnxruntime" in exporters:
        import onnxruntime
        versions += f", onnxruntime {onnxruntime.__version__}"
    cmd = f"python -m benchmarks.bench_deploy {' '.join(argv if argv is not None else sys.argv[1:])}"
    forms = ["eager", "folded"] + exporters
    head = ("| model | " + " | ".join(f"{f} ms/img" for f in forms) + " | "
            + " | ".join(f"{f} vs eager" for f in forms[1:]) + " | max rel. error vs eager |\n"
            + "|---|" + "---:|" * (2 * len(forms) - 1) + "---:|")
    print(head)
    rows = []
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.input_size, args.input_size)
    for name in names:
        model = build_model({**MODELS[name], "num_classes": 1000}).eval()
        inf = to_inference(model)
        fns = {"eager": model, "folded": inf}
        for which in exporters:
            fns[which] = exported(inf, x, which, args.threads)
        with torch.no_grad():
            ref = model(x)
            err = max(relative_error(fn(x), ref) for key, fn in fns.items() if key != "eager")
        med = interleaved(fns, x, args.rounds)
        per_img = {k: v / args.batch * 1e3 for k, v in med.items()}
        row = (f"| {name} | " + " | ".join(f"{per_img[f]:.1f}" for f in forms) + " | "
               + " | ".join(f"{med[f] / med['eager']:.2f}x" for f in forms[1:]) + f" | {err:.1e} |")
        print(row, flush=True)
        rows.append(row)
    end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = (f"# Deployment: inference time per image on CPU (issue 13)\n\nCommand: `{cmd}`\n\n"
            f"{versions}, {platform.machine()}, {args.threads} thread(s) (onnxruntime intra-op threads too), "
            f"batch {args.batch} at {args.input_size}x{args.input_size}, fp32, NCHW; medians of {args.rounds} "
            f"interleaved rounds after 2 warm-up calls; load average {load:.1f} at start, {end_load:.1f} at the end "
            f"on {os.cpu_count()} cores (a shared box: absolute times are noisy, the ratios of one row are measured "
            f"side by side). 'folded' is models.inference.to_inference run eagerly; the exported forms are that "
            f"model exported as tools.deploy does (ONNX with the legacy exporter) and loaded back.\n\n"
            + head + "\n" + "\n".join(rows) + "\n")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
