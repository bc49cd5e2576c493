"""Evaluate a checkpoint:  python -m tools.test CONFIG CHECKPOINT [key=value ...] [--ema] [--out FILE]

CHECKPOINT is a path, a model-zoo name or a URL (engine.hub.resolve_checkpoint);
our training checkpoints, exported zoo weights, torchvision files and the
original CE/ED/WE repositories' files all load (models.weights.load_weights).
Top-1/top-5/loss are counted once per validation image across processes, printed,
and written as JSON next to the run: ``<work_dir>/test_<checkpoint name>.json``
(the work dir holding ``checkpoints/`` for our checkpoints, else runtime.work_dir
or ``work_dirs/<config name>``). Exit codes as tools/train.py: 0 done, 1 a bug
(traceback), 2 refused input, 75 stopped by SIGTERM/SIGINT/SIGUSR1 (nothing
written: run it again), 76 a process or data worker of the evaluation died.
"""
import argparse
import json
import os
import signal
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


def evaluate_checkpoint(cfg, spec, ema=False):
    """(metrics, local checkpoint path, number of validation images, weights load report)."""
    import torch

    import data as data_lib
    from engine import distributed as du
    from engine.checkpoint import CheckpointError, load_checkpoint
    from engine.evaluator import evaluate
    from engine.hub import resolve_checkpoint
    from models import build_model
    from models.features import require_classifier
    from models.weights import load_weights
    require_classifier(cfg.model, "./test.sh (top-1/top-5 evaluation)")
    info = du.init_distributed(cfg.dist, cfg.runtime.device)
    dataset = data_lib.build_dataset(cfg.data, "val", num_classes=cfg.model.num_classes)
    loader = data_lib.build_loader(dataset, cfg.data, "val", max(cfg.eval.batch_size // info.world_size, 1),
                                   info.distributed, cfg.runtime.seed)
    transform = data_lib.build_device_transform(
        {**cfg.data, "channels_last": cfg.data.channels_last or cfg.train.channels_last}, "val")
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
    model = build_model(cfg.model)
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
    _stop.evaluating = True  # from here a stop signal is noticed between batches (not inside a worker's fork)
    metrics = evaluate(model, loader, info.device, transform, amp, on_batch=_stop.check)
    return metrics, path, len(dataset), report


class _Stop:
    """A stop signal: raised at once during setup (as tools/train.py), after the current batch while evaluating."""
    evaluating, signum = False, None

    def handle(self, signum, frame):
        from tools.train import stop_now
        if not self.evaluating:
            stop_now(signum, frame)
        self.signum = self.signum or signum

    def check(self, batch):
        from tools.train import StoppedBeforeStart
        if self.signum is not None:
            raise StoppedBeforeStart(signal.Signals(self.signum).name)


_stop = _Stop()


def run(argv=None):
    from tools.train import SETUP_STOP_SIGNALS, StoppedBeforeStart
    previous = {s: signal.signal(s, _stop.handle) for s in SETUP_STOP_SIGNALS}
    try:
        code = _run(argv)
    except StoppedBeforeStart as e:  # stop signals stay ignored: the process ends now
        if (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0":  # every rank got it
            print(f"stopped by {e.args[0]}: the evaluation was interrupted and wrote nothing; run the same command "
                  "again", file=sys.stderr, flush=True)
        return 75  # engine.guard.EXIT_PREEMPTED
    for s, handler in previous.items():
        signal.signal(s, handler)
    return code


def _run(argv):
    from data.errors import worker_lost
    from engine import distributed as du
    from engine.checkpoint import CheckpointError, atomic_write
    from engine.config import load_config
    from engine.fields import ConfigError
    from engine.guard import EXIT_OK, EXIT_PEER_LOST, EXIT_USAGE
    from engine.relay import report_error
    from models.weights import WeightsMismatchError
    args = parse_args(argv)
    code, err = EXIT_OK, None
    try:
        cfg = load_config(args.config, args.overrides)
        start = time.time()
        metrics, path, size, report = evaluate_checkpoint(cfg, args.checkpoint, args.ema)
    except (ConfigError, CheckpointError, WeightsMismatchError) as e:
        code, err = EXIT_USAGE, f"error: {e}"
    except RuntimeError as e:  # a dead process or data worker: one line, else a bug (traceback)
        lost = du.as_peer_lost(e) or worker_lost(e)
        if lost is None:
            raise
        code, err = EXIT_PEER_LOST, f"error: {lost}"
        if os.environ.get("BLOCKLAB_LAUNCHER") and "lost contact" in err:  # the launcher names the process
            err = None
    if code != EXIT_OK:
        du.destroy()
        if err:
            report_error(err)
        return code
    if du.get_rank() == 0:
        out = result_path(args, cfg, path)
        record = {"config": args.config, "checkpoint": args.checkpoint, "path": os.path.abspath(path),
                  "ema": args.ema, "weights": f"{report.source}: {report.summary()}", **metrics,
                  "dataset_size": size, "world_size": du.get_world_size(), "time_s": round(time.time() - start, 2)}
        print(f"{args.checkpoint}: top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} "
              f"loss {metrics['loss']:.4f} ({metrics['count']}/{size} images)")
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
