"""Deploy a checkpoint: build its inference form, export it, and check the file against eager eval.

    python -m tools.deploy CONFIG CHECKPOINT [key=value ...] --format onnx|torchscript|export --out FILE
        [--input-size N] [--batch N] [--dynamic] [--ema] [--onnx-exporter legacy|dynamo]

CHECKPOINT is anything tools.test accepts (our checkpoints, zoo weights, torchvision and the original
repositories' files; a path, zoo name or URL), loaded with ``weights_only=True``. Steps:

1. the model in eval mode and its inference form (``models.inference.to_inference``: WE folded into
   plain convs, BatchNorm folded into the conv feeding it, CE's BD as a fixed grouped 1x1 conv, ED's
   BNs folded); the relative error between the two is printed;
2. export of the inference form: ``onnx`` (torch.onnx.export; the legacy TorchScript-based exporter
   by default, ``--onnx-exporter dynamo`` for the torch.export-based one), ``torchscript``
   (torch.jit.trace: torch.jit.script does not support these models) or ``export``
   (torch.export.export + torch.export.save, a .pt2 file); ``--dynamic`` makes batch, height and
   width dynamic;
3. the file is loaded back with its runtime (onnxruntime, torch.jit.load, torch.export.load) and its
   outputs compared with the eager eval model's on a few random inputs (other batch sizes and
   spatial sizes, odd ones included, with ``--dynamic``): each must be within 1e-4 relative
   (max |diff| / max |eager|).

A features-only model (``model.features_only=true model.out_indices=[...]``) exports
its maps: ONNX outputs ``feature_0``, ``feature_1``, ..., a dict from TorchScript and torch.export;
each map is checked.

The file carries the preprocessing a user must apply and the class names (data.preprocess): input
size, eval resize, mean/std, layout (NCHW float32, RGB, uint8 / 255 then (x - mean) / std) and the
checkpoint's ``classes``, as ONNX ``metadata_props`` (keys ``blocklab.*``, JSON values) or, for
TorchScript and torch.export, a sidecar ``FILE.json`` with the same keys; they are printed too.
``python -m tools.predict FILE IMAGE...`` reads them.

Only then is the file written (a temporary file renamed into place): a failed step leaves no file.
Exit 0 on success, 2 for bad input (one line: missing file, a checkpoint of another architecture,
unknown format, onnxruntime not installed), 1 when export or the check fails.
"""
import argparse
import importlib
import json
import os
import sys
import time

from core.exits import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from models.export import (FORMATS, ONNX_EXPORTERS, TOLERANCE, CheckFailed, check_shapes, export_bytes, runner,
                           with_metadata)


class DeployError(ValueError):
    """Bad input to the deploy tool; one line."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Export a checkpoint's inference form and check it against eager eval.")
    p.add_argument("config", help="YAML config the checkpoint was trained with")
    p.add_argument("checkpoint", help="checkpoint path, model-zoo name or URL")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (YAML values)")
    p.add_argument("--format", required=True, help="onnx, torchscript or export (torch.export .pt2)")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--input-size", type=int, default=None, help="export input side (default: data.input_size)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the example input (default 2)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width (checked at other sizes)")
    p.add_argument("--ema", action="store_true", help="deploy the EMA weights of a training checkpoint")
    p.add_argument("--onnx-exporter", default="legacy", help="legacy (default) or dynamo")
    return p.parse_intermixed_args(argv)


def check_args(args):
    """Refuse what cannot work before anything is loaded."""
    if args.format not in FORMATS:
        raise DeployError(f"unknown --format {args.format!r}; valid: {', '.join(FORMATS)}")
    if args.onnx_exporter not in ONNX_EXPORTERS:
        raise DeployError(f"unknown --onnx-exporter {args.onnx_exporter!r}; valid: {', '.join(ONNX_EXPORTERS)}")
    if not os.path.isfile(args.config):
        raise DeployError(f"config {args.config} does not exist")
    if args.batch < 1 or (args.input_size is not None and args.input_size < 8):
        raise DeployError("--batch must be >= 1 and --input-size >= 8")
    if os.path.isdir(args.out):
        raise DeployError(f"--out {args.out} is a directory; give a file name")
    if args.format == "onnx":
        for mod in ("onnx", "onnxruntime"):
            try:
                importlib.import_module(mod)
            except ImportError:
                raise DeployError(f"--format onnx needs {mod}, which is not installed: pip install onnx onnxscript "
                                  f"onnxruntime (or use --format export / torchscript)") from None


def load_model(args):
    """(config, eval model with the checkpoint's weights, weights load report, the checkpoint's class names)."""
    from engine.checkpoint import load_checkpoint
    from engine.config import load_config
    from engine.hub import resolve_checkpoint
    from models import build_model
    from models.weights import WeightsMismatchError, checkpoint_weights, load_weights
    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg.model)
    state = load_checkpoint(resolve_checkpoint(args.checkpoint))
    classes = state.get("classes") if isinstance(state, dict) else None
    try:
        report = load_weights(model, checkpoint_weights(state, args.ema, args.checkpoint))
    except WeightsMismatchError as exc:
        raise DeployError(f"checkpoint {args.checkpoint}: {str(exc).replace('weights in <state dict> ', '', 1)}") from None
    return cfg, model.float().eval(), report, classes


def preprocessing(cfg, classes, size):
    """The data.preprocess.Preprocessing of the exported file: the config's eval recipe at input side ``size``
    (None: the config's input size)."""
    import dataclasses

    from data.preprocess import Preprocessing
    pre = Preprocessing.from_config(cfg.data, classes)
    size = size or pre.input_size
    resize = max(pre.eval_resize, size) if pre.eval_resize else None
    return dataclasses.replace(pre, input_size=size, eval_resize=resize)


def deploy(args):
    """Run the steps of the module doc; returns the summary line. Raises DeployError / CheckFailed."""
    import torch

    from engine.checkpoint import atomic_write
    from models.inference import relative_error, to_inference
    check_args(args)
    cfg, model, report, classes = load_model(args)
    pre = preprocessing(cfg, classes, args.input_size)
    size = pre.input_size
    in_chans = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(n, in_chans, h, w, generator=gen) for n, h, w in check_shapes(args.batch, size, args.dynamic)]
    try:
        with torch.no_grad():
            eager = [model(x) for x in inputs]
            inf = to_inference(model)
            fold_err = max(relative_error(inf(x), ref) for x, ref in zip(inputs, eager))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeployError(f"the model does not run at inputs {[tuple(x.shape) for x in inputs]}: {first[:300]}; "
                          f"change --input-size") from None
    what = ", ".join(f"{v} {k}" for k, v in sorted(inf.inference_summary.items()) if k != "conv_bn_folded")
    print(f"inference form: {inf.inference_summary['conv_bn_folded']} conv+BN folded"
          + (f", replaced {what}" if what else "") + f"; relative error vs the eval model {fold_err:.1e}")
    if fold_err > TOLERANCE:
        raise CheckFailed(f"the inference form differs from the eval model by {fold_err:.1e} relative "
                          f"(limit {TOLERANCE:g}); nothing written")
    start = time.time()
    try:
        data = with_metadata(export_bytes(inf, inputs[0], args.format, args.dynamic, args.onnx_exporter),
                             args.format, pre.metadata())
        run = runner(data, args.format)
        with torch.no_grad():
            errs = [relative_error(run(x), ref) for x, ref in zip(inputs, eager)]
    except Exception as exc:  # noqa: BLE001 -- exporter/runtime errors are many types; report one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if args.format == "export" and args.dynamic and "Guard failed" in first:
            first += (" (torch.export fixes dims of size 1: a 1x1 feature map at this input size; "
                      "export at a larger --input-size)")
        raise CheckFailed(f"{args.format} export or its check failed: {type(exc).__name__}: {first[:300]}; "
                          f"nothing written") from exc
    bad = [(tuple(x.shape), e) for x, e in zip(inputs, errs) if not e <= TOLERANCE]
    if bad:
        raise CheckFailed(f"the {args.format} file's outputs differ from eager eval: relative error {bad[0][1]:.1e} "
                          f"at input {bad[0][0]} (limit {TOLERANCE:g}); nothing written")
    fix = "pass --out FILE in a writable folder"
    if args.format != "onnx":  # the sidecar first: a model file is never left without its metadata
        sidecar = json.dumps(pre.metadata(), indent=2).encode()
        atomic_write(args.out + ".json", lambda f: f.write(sidecar), fix=fix)
    try:
        atomic_write(args.out, lambda f: f.write(data), fix=fix)
    except Exception:
        if args.format != "onnx":
            os.remove(args.out + ".json")
        raise
    where = "metadata_props" if args.format == "onnx" else f"{args.out}.json"
    print(f"preprocessing ({where}): {pre.describe()}")
    runtime = {"onnx": "onnxruntime", "torchscript": "torch.jit.load", "export": "torch.export.load"}[args.format]
    shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs)
    exporter = f" ({args.onnx_exporter} exporter)" if args.format == "onnx" else ""
    return (f"deployed {args.out}: {args.format}{exporter}, {len(data) / 1e6:.1f} MB, weights {report.summary()}; "
            f"{runtime} vs eager eval max relative error {max(errs):.1e} on {shapes} "
            f"(inference form {fold_err:.1e}; export + check {time.time() - start:.1f} s)")


def main(argv=None):
    from core.fields import ConfigError
    from engine.checkpoint import CheckpointError
    from models.weights import WeightsMismatchError
    args = parse_args(argv)
    try:
        print(deploy(args))
    except (DeployError, ConfigError, CheckpointError, WeightsMismatchError) as exc:
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    except CheckFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
