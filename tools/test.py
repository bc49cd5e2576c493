"""Evaluate a checkpoint:  python -m tools.test CONFIG CHECKPOINT [key=value ...] [--ema] [--out FILE]

CHECKPOINT is a path, a model-zoo name or a URL (engine.hub.resolve_checkpoint);
our training checkpoints, exported zoo weights, torchvision files and the
original CE/ED/WE repositories' files all load (models.weights.load_weights).
Top-1/top-5/loss (classification) or COCO AP (task: detection, with the standard
table; the detections go to ``detections_<checkpoint name>.json`` beside the
metrics) are counted once per validation image across processes, printed,
and written as JSON next to the run: ``<work_dir>/test_<checkpoint name>.json``
(the work dir holding ``checkpoints/`` for our checkpoints, else runtime.work_dir
or ``work_dirs/<config name>``). Exit codes as tools/train.py (0, 1, 2).
"""
import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a blocklab checkpoint.")
    p.add_argument("config", help="YAML config the checkpoint was trained with")
    p.add_argument("checkpoint", help="checkpoint path, model-zoo name or URL")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    p.add_argument("--out", default=None, help="where to write the metrics JSON")
    return p.parse_args(argv)


def result_path(args, cfg, ckpt_path):
    if args.out:
        return args.out
    name = os.path.splitext(os.path.basename(ckpt_path))[0] + ("_ema" if args.ema else "")
    parent = os.path.dirname(os.path.abspath(ckpt_path))
    if os.path.basename(parent) == "checkpoints" and os.path.isfile(os.path.join(parent, "..", "config.yaml")):
        work_dir = os.path.dirname(parent)
    else:
        from tools.train import default_work_dir
        work_dir = cfg.runtime.work_dir or default_work_dir(args.config)
    return os.path.join(work_dir, f"test_{name}.json")


def evaluate_checkpoint(cfg, spec, ema=False, results_path=None):
    """(metrics, local checkpoint path, number of validation images, weights load report, task).

    ``results_path``: detection writes its COCO result entries there."""
    import torch

    import data as data_lib
    from engine import distributed as du
    from engine.checkpoint import CheckpointError, load_checkpoint
    from engine.hub import resolve_checkpoint
    from engine.tasks import build_task
    from models.weights import load_weights
    task = build_task(cfg)
    info = du.init_distributed(cfg.dist, cfg.runtime.device)
    dataset = task.build_dataset("val")
    loader = data_lib.build_loader(dataset, cfg.data, "val", max(cfg.eval.batch_size // info.world_size, 1),
                                   info.distributed, cfg.runtime.seed)
    transform = task.device_transform("val")
    if hasattr(transform, "to"):
        transform.to(info.device)
    err = path = None
    if info.is_main:  # download once, then every rank finds it in the cache
        try:
            path = resolve_checkpoint(spec)
        except CheckpointError as e:
            err = e
    err = du.broadcast_object(err)
    if err is not None:
        raise err
    path = path or resolve_checkpoint(spec)
    model = task.build_model(cfg.model)
    state = load_checkpoint(path)
    if ema:
        if not (isinstance(state, dict) and isinstance(state.get("ema"), dict)):
            from engine.fields import ConfigError
            raise ConfigError(f"{path} holds no EMA weights; drop --ema")
        state = state["ema"]["module"]
    report = load_weights(model, state)
    model.to(info.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    amp = cfg.train.amp if info.device.type == "cuda" else "none"
    metrics = task.evaluate(model, loader, info.device, transform, amp, results_path)
    return metrics, path, len(dataset), report, task


def run(argv=None):
    from engine import distributed as du
    from engine.checkpoint import CheckpointError, atomic_write
    from engine.config import load_config
    from engine.fields import ConfigError
    from engine.guard import EXIT_OK, EXIT_USAGE
    from models.weights import WeightsMismatchError
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        start = time.time()
        detections = None
        if cfg.get("task") == "detection":  # COCO result entries beside the metrics: detections_<name>.json
            out = result_path(args, cfg, args.checkpoint)
            detections = os.path.join(os.path.dirname(out), "detections_" + os.path.basename(out)[len("test_"):]) \
                if os.path.basename(out).startswith("test_") else os.path.splitext(out)[0] + "_detections.json"
        metrics, path, size, report, task = evaluate_checkpoint(cfg, args.checkpoint, args.ema, detections)
    except (ConfigError, CheckpointError, WeightsMismatchError) as e:
        if du.launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        du.destroy()
        return EXIT_USAGE
    if du.get_rank() == 0:
        out = result_path(args, cfg, path)
        record = {"config": args.config, "checkpoint": args.checkpoint, "path": os.path.abspath(path),
                  "ema": args.ema, "weights": f"{report.source}: {report.summary()}", **metrics,
                  "dataset_size": size, "world_size": du.get_world_size(), "time_s": round(time.time() - start, 2)}
        if "table" in metrics:
            print(metrics.pop("table"))
        print(f"{args.checkpoint}: {task.val_line(metrics)} ({metrics['count']}/{size} images)")
        try:
            atomic_write(out, lambda f: f.write(json.dumps(record, indent=2).encode()),
                         fix="pass --out FILE in a writable folder (the metrics above are complete)")
        except CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            du.destroy()
            return EXIT_USAGE
        print(f"metrics written to {out}")
    du.destroy()
    return EXIT_OK


def main(argv=None):
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
