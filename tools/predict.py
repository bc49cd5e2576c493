"""Classify image files:  python -m tools.predict CHECKPOINT_OR_FILE IMAGE... [--topk 5] [--json]

CHECKPOINT_OR_FILE is a training checkpoint, as tools.test takes it (a path, zoo name or URL; its stored
config and class names are used; ``--config`` gives a config to weights without one, ``--ema`` takes
the EMA weights), or a file
written by tools.deploy: ``.onnx`` (run with onnxruntime, preprocessing from its metadata_props) or
a TorchScript / ``.pt2`` file with its ``FILE.json`` sidecar. Images are preprocessed as ./test.sh
evaluates an image folder (data.preprocess). One line per image: the top-k class names (or indices
when the checkpoint has none) with their softmax probabilities; ``--json``: one JSON object per line.
Exit 0, or 2 with one line for bad input (a missing file, an unreadable image, no preprocessing).
"""
import argparse
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Classify image files with a checkpoint or an exported model.")
    p.add_argument("model", help="training checkpoint, or a tools.deploy file (.onnx, .pt2, TorchScript + .json)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--config", default=None, help="checkpoints: config to use instead of the stored one")
    p.add_argument("--ema", action="store_true", help="checkpoints: the EMA weights")
    return p.parse_args(argv)


def load_exported(path):
    """(Preprocessing, logits function) for a tools.deploy file."""
    import torch

    from data.preprocess import Preprocessing
    from models.export import runner
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".onnx"):
        import onnx
        props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
        return Preprocessing.from_metadata(props, path), runner(data, "onnx")
    with open(path + ".json") as f:
        pre = Preprocessing.from_metadata(json.load(f), path + ".json")
    run = runner(data, "export" if path.endswith(".pt2") else "torchscript")
    return pre, lambda x: torch.as_tensor(run(x))


def load_checkpoint_model(path, config=None, ema=False):
    """(Preprocessing, eval model) for a training checkpoint, with its stored (or the given) config."""
    from core.fields import ConfigError
    from data.preprocess import Preprocessing
    from engine.checkpoint import load_checkpoint
    from engine.config import from_tree, load_config
    from models import build_model
    from models.weights import checkpoint_weights, load_weights
    state = load_checkpoint(path)
    if config is None and not (isinstance(state, dict) and isinstance(state.get("config"), dict)):
        raise ConfigError(f"{path} holds no config (not a blocklab training checkpoint); pass --config CONFIG")
    cfg = load_config(config) if config else from_tree(state["config"])
    classes = state.get("classes") if isinstance(state, dict) else None
    model = build_model(cfg.model)
    load_weights(model, checkpoint_weights(state, ema, path))
    return Preprocessing.from_config(cfg.data, classes), model.float().eval()


def predict(args):
    """The output lines for ``args``."""
    import torch

    from engine.hub import resolve_checkpoint
    if args.topk < 1:
        raise ValueError("--topk must be >= 1")
    exported = args.model.endswith(".onnx") or os.path.isfile(args.model + ".json")
    missing = [p for p in ([args.model] if exported else []) + args.images if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{missing[0]} does not exist; check the path")
    if exported:
        pre, model = load_exported(args.model)
    else:
        pre, model = load_checkpoint_model(resolve_checkpoint(args.model), args.config, args.ema)
    with torch.no_grad():
        probs = torch.cat([model(pre.load([p])) for p in args.images]).float().softmax(1)
    top = probs.topk(min(args.topk, probs.shape[1]), dim=1)
    lines = []
    for path, values, indices in zip(args.images, top.values.tolist(), top.indices.tolist()):
        names = [pre.classes[i] if pre.classes else str(i) for i in indices]
        if args.json:
            lines.append(json.dumps({"image": path, "top": [{"class": n, "index": i, "prob": round(v, 6)}
                                                            for n, i, v in zip(names, indices, values)]}))
        else:
            lines.append(f"{path}: " + ", ".join(f"{n} {v:.4f}" for n, v in zip(names, values)))
    return lines


def main(argv=None):
    from core.fields import ConfigError
    from engine.checkpoint import CheckpointError
    from models.weights import WeightsMismatchError
    args = parse_args(argv)
    try:
        print("\n".join(predict(args)))
    except (ValueError, ConfigError, CheckpointError, WeightsMismatchError, OSError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
