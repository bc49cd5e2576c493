"""Parameters and GFLOPs of any config at its input size.

    python -m tools.flops configs/imagenet/ce_resnet50.yaml [key=value ...]
    python -m tools.flops --table          # the README's table vs the published figures

GFLOPs are multiply-accumulates (the convention of torchvision's tables and the
ED README: ResNet-50 = 4.1), counted on what actually runs with
``torch.utils.flop_counter`` (convs, matmuls, CE's Newton iterations; not
elementwise ops) for one image in eval mode.
"""
import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode


def complexity(model, input_size, in_chans=3):
    """(parameters, GMACs) of ``model`` on one ``in_chans x input_size x input_size`` image, eval mode."""
    params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, input_size, input_size))
    model.train(was_training)
    return params, counter.get_total_flops() / 2e9


# name: (model section, input size, published params (M) or None, published GFLOPs, source)
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
}


def table(rows):
    from models import build_model
    lines = ["| model | params (M) | published params (M) | GFLOPs | published GFLOPs | source |",
             "|---|---:|---:|---:|---:|---|"]
    for name, (model_cfg, size, pub_params, pub_gflops, source) in rows.items():
        params, gmacs = complexity(build_model(dict(model_cfg, num_classes=1000)), size)
        pp = f"{pub_params:.2f}" if pub_params else "-"
        lines.append(f"| {name} | {params / 1e6:.2f} | {pp} | {gmacs:.2f} | {pub_gflops:.2f} | {source} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--input-size", type=int, help="default: the config's data.input_size")
    parser.add_argument("--table", action="store_true", help="print the published-figures table")
    args = parser.parse_args(argv)
    if args.table:
        rows = dict(PUBLISHED)
        try:
            from blocks.ed import PUBLISHED_GFLOPS as ed_rows
            rows.update(ed_rows)
        except ImportError:
            pass
        print(table(rows))
        return 0
    if not args.config:
        parser.error("give a config, or --table")
    from engine.config import load_config
    from models import build_model
    cfg = load_config(args.config, args.overrides)
    size = args.input_size or cfg.data.input_size
    params, gmacs = complexity(build_model(cfg.model), size)
    print(f"{args.config}: {params / 1e6:.3f} M parameters, {gmacs:.3f} GFLOPs (MACs) at {size}x{size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
