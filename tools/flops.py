"""Parameters and GFLOPs of any config at its input size.

    python -m tools.flops configs/imagenet/cenet/ce_resnet50.yaml [key=value ...] [--convention ednet]
    python -m tools.flops --table          # the tables of docs/tools.md vs the published figures

``--convention macs`` (default) counts true multiply-accumulates, as torchvision's tables do; ``ednet``
reproduces the ED-Net README's counting (thop's module rules). analysis/flops.py says exactly what each
counts; every other figure in this repository (model zoo, benchmarks) is ``macs``.
"""
import argparse
import sys

import torch

from analysis.flops import CONVENTIONS, complexity

PUBLISHED = {
    "resnet18": ({"backbone": "resnet18"}, 224, 11.69, 1.81, "torchvision"),
    "resnet34": ({"backbone": "resnet34"}, 224, 21.80, 3.66, "torchvision"),
    "resnet50": ({"backbone": "resnet50"}, 224, 25.56, 4.09, "torchvision"),
    "resnet101": ({"backbone": "resnet101"}, 224, 44.55, 7.80, "torchvision"),
    "resnet152": ({"backbone": "resnet152"}, 224, 60.19, 11.51, "torchvision"),
    "resnext50_32x4d": ({"backbone": "resnext50_32x4d"}, 224, 25.03, 4.23, "torchvision"),
    "resnext101_32x4d": ({"backbone": "resnext101_32x4d"}, 224, 44.18, 8.0, "ResNeXt paper / ED README"),
    "resnext101_32x8d": ({"backbone": "resnext101_32x8d"}, 224, 88.79, 16.41, "torchvision"),
    "mobilenet_v2": ({"backbone": "mobilenet_v2"}, 224, 3.50, 0.30, "torchvision"),
    "shufflenet_v2_x0_5": ({"backbone": "shufflenet_v2_x0_5"}, 224, 1.37, 0.04, "torchvision"),
    "shufflenet_v2_x1_0": ({"backbone": "shufflenet_v2_x1_0"}, 224, 2.28, 0.145, "torchvision"),
    "shufflenet_v2_x1_5": ({"backbone": "shufflenet_v2_x1_5"}, 224, 3.50, 0.296, "torchvision"),
    "shufflenet_v2_x2_0": ({"backbone": "shufflenet_v2_x2_0"}, 224, 7.39, 0.583, "torchvision"),
}


def _build(model_cfg):
    from models import build_model
    with torch.device("meta"):   # shapes are all the counters need
        return build_model(dict(model_cfg, num_classes=1000))


def _rel(value, reference):
    return f"{100 * (value / reference - 1):+.1f}%" if reference else "-"


def table(rows):
    """Markdown table: params and true GMACs (``macs``) against published figures."""
    lines = ["| model | params (M) | published params (M) | GFLOPs (MACs) | published GFLOPs | diff | source |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, (model_cfg, size, pub_params, pub_gflops, source) in rows.items():
        params, gmacs = complexity(_build(model_cfg), size)
        pp = f"{pub_params:.2f}" if pub_params else "-"
        lines.append(f"| {name} | {params / 1e6:.2f} | {pp} | {gmacs:.2f} | {pub_gflops:.2f} | "
                     f"{_rel(gmacs, pub_gflops)} | {source} |")
    return "\n".join(lines)


def ednet_table(rows):
    """Markdown table for the ED-Net README's figures: true MACs and the README's (``ednet``) counting."""
    lines = ["| model | params (M) | GFLOPs (MACs) | GFLOPs (ED README counting) | ED README GFLOPs | "
             "diff (README counting) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, (model_cfg, size, _pub_params, pub_gflops, _source) in rows.items():
        model = _build(model_cfg)
        params, gmacs = complexity(model, size)
        _, ednet = complexity(model, size, convention="ednet")
        pub = f"{pub_gflops:.1f}" if pub_gflops else "-"
        lines.append(f"| {name} | {params / 1e6:.2f} | {gmacs:.3f} | {ednet:.3f} | {pub} | "
                     f"{_rel(ednet, pub_gflops)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--input-size", type=int, help="default: the config's data.input_size")
    parser.add_argument("--convention", choices=CONVENTIONS, default="macs",
                        help="macs: true multiply-accumulates (default); ednet: the ED-Net README's counting")
    parser.add_argument("--table", action="store_true", help="print the published-figures tables")
    args = parser.parse_args(argv)
    if args.table:
        print("Plain backbones, true multiply-accumulates vs torchvision's published figures:\n")
        print(table(PUBLISHED))
        from blocks.ed import PUBLISHED_GFLOPS
        print("\nED-Net README's GFLOPs table (its counting: transposed convs charged per output "
              "pixel, norms 4/element; see `--convention ednet`):\n")
        print(ednet_table(PUBLISHED_GFLOPS))
        return 0
    if not args.config:
        parser.error("give a config, or --table")
    from engine.config import load_config
    from models import build_model
    cfg = load_config(args.config, args.overrides)
    size = args.input_size or cfg.data.input_size
    params, gflops = complexity(build_model(cfg.model), size, convention=args.convention)
    unit = "GFLOPs (MACs)" if args.convention == "macs" else "GFLOPs (ED README counting)"
    print(f"{args.config}: {params / 1e6:.3f} M parameters, {gflops:.3f} {unit} at {size}x{size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
