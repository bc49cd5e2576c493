"""Evaluate a checkpoint:  python -m tools.test [CONFIG] CHECKPOINT [key=value ...] [--ema] [--out FILE]

CHECKPOINT is a path, a work dir (its ``best.pth``, else its newest readable
checkpoint), a ``checkpoints/latest`` pointer, a model-zoo name or a URL
(engine.hub.resolve_checkpoint). Without CONFIG the config stored in the
checkpoint is used (training-time overrides such as ``data.root`` included; a
zoo name: its index entry's config); a given CONFIG wins. Either way every
preprocessing or model key that differs from the checkpoint's stored config is
printed as a warning line (and kept in the metrics JSON): no silent difference.
Our training checkpoints, exported zoo weights, torchvision files and the
original CE/ED/WE repositories' files all load (models.weights.load_weights);
every file's integrity is checked (engine.integrity).
Top-1/top-5/loss (classification) or COCO AP (task: detection, with the standard
table; the detections go to ``detections_<checkpoint name>.json`` beside the
metrics) are counted once per validation image across processes, printed,
and written as JSON next to the run: ``<work_dir>/test_<checkpoint name>.json``
(the work dir holding ``checkpoints/`` for our checkpoints, else runtime.work_dir
or the config's default work dir). Exit codes as tools/train.py: 0 done, 1 a bug
(traceback), 2 refused input (one line), 75 stopped by SIGTERM/SIGINT/SIGUSR1 (nothing
written: run it again), 76 a process or data worker of the evaluation died.
"""
import argparse
import json
import os
import signal
import sys
import time

from core.exits import EXIT_OK, EXIT_PEER_LOST, EXIT_PREEMPTED, EXIT_USAGE, STOP_SIGNALS, StoppedBeforeStart, stop_now
from engine.ownership import flatten

CONFIG_SUFFIXES = (".yaml", ".yml")
# model keys that do not change what a trained model computes at evaluation
_EVAL_NEUTRAL_MODEL_KEYS = ("model.pretrained", "model.pretrained_ignore", "model.frozen_stages", "model.norm_eval")
# the preprocessing evaluation uses (data.recipe.Recipe fields) and the config keys that set them
_EVAL_DATA = {"dataset": "data.dataset", "input_size": "data.input_size", "eval_resize": "data.eval_resize",
              "mean": "data.mean/normalize", "std": "data.std/normalize"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a blocklab checkpoint.")
    p.add_argument("inputs", nargs="+", metavar="[CONFIG] CHECKPOINT [key=value ...]",
                   help="optional YAML config (default: the one stored in the checkpoint), then a checkpoint path, "
                        "work dir, checkpoints/latest pointer, model-zoo name or URL, then config overrides")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    p.add_argument("--out", default=None, help="where to write the metrics JSON")
    args = p.parse_args(argv)
    inputs = list(args.inputs)
    args.config = inputs.pop(0) if inputs[0].endswith(CONFIG_SUFFIXES) else None
    if not inputs or "=" in inputs[0] and not os.path.exists(inputs[0]):
        p.error("give a CHECKPOINT (a path, work dir, model-zoo name or URL)")
    args.checkpoint, args.overrides = inputs[0], inputs[1:]
    if args.checkpoint.startswith("~"):  # quoted, so the shell left it: a path in the home folder
        args.checkpoint = os.path.expanduser(args.checkpoint)
    return args


def config_from_checkpoint(spec, overrides):
    """(config, local path or None, loaded state or None) for ``./test.sh CHECKPOINT`` without a config."""
    from core.fields import ConfigError
    from engine.checkpoint import load_checkpoint
    from engine.config import from_tree, load_config
    from engine.hub import REPO_ROOT, load_index, resolve_checkpoint
    zoo = load_index().get(spec)
    if isinstance(zoo, dict) and zoo.get("config"):
        return load_config(os.path.join(REPO_ROOT, zoo["config"]), overrides), None, None
    if "://" in spec:
        raise ConfigError(f"{spec} is a URL, and its config cannot be read before it is downloaded; give the "
                          f"config first: ./test.sh CONFIG {spec}")
    path = resolve_checkpoint(spec)
    state = load_checkpoint(path)
    tree = state.get("config") if isinstance(state, dict) else None
    if not isinstance(tree, dict):
        raise ConfigError(f"checkpoint {path} stores no config (it is not a blocklab training checkpoint); give "
                          f"the config it was trained with first: ./test.sh CONFIG {spec}")
    return from_tree(tree, overrides, where=f"the config stored in {path}"), path, state


def eval_differences(stored, cfg):
    """``[(key, stored value, used value)]``: the preprocessing and model keys where evaluation differs from
    the config the checkpoint was trained with (presets resolved: ``normalize: auto`` vs the same numbers is
    no difference)."""
    from core.fields import ConfigError
    from data.recipe import build_recipe
    from engine.config import from_tree
    try:
        stored_cfg = from_tree(stored, where="stored")
    except ConfigError:  # written by another version of blocklab: compare the keys it has
        stored_cfg = None
    out = []
    if stored_cfg is not None:
        a, b = build_recipe(stored_cfg.data), build_recipe(cfg.data)
        out += [(key, getattr(a, f), getattr(b, f)) for f, key in _EVAL_DATA.items() if getattr(a, f) != getattr(b, f)]
    old, new = flatten(stored.get("model") or {}, "model."), flatten(cfg.model.to_dict(), "model.")
    out += [(k, old[k], new[k]) for k in sorted(set(old) & set(new))
            if old[k] != new[k] and k not in _EVAL_NEUTRAL_MODEL_KEYS]
    return out


def result_path(args, cfg, ckpt_path):
    if args.out:
        return args.out
    name = os.path.splitext(os.path.basename(ckpt_path))[0] + ("_ema" if args.ema else "")
    parent = os.path.dirname(os.path.abspath(ckpt_path))
    if os.path.basename(parent) == "checkpoints" and os.path.isfile(os.path.join(parent, "..", "config.yaml")):
        work_dir = os.path.dirname(parent)
    else:
        from engine.config import default_work_dir
        work_dir = cfg.runtime.work_dir or default_work_dir(args.config or ckpt_path)
    return os.path.join(work_dir, f"test_{name}.json")


def evaluate_checkpoint(cfg, spec, ema=False, path=None, state=None, fix=None, results_path=None):
    """(metrics, local checkpoint path, number of validation images, weights load report, loaded state, task).

    ``path``/``state``: the checkpoint already resolved and loaded (``./test.sh CHECKPOINT``); ``fix``:
    what to do when its weights do not fit the config's model; ``results_path``: detection writes its COCO
    result entries there.
    """
    import torch

    from engine import distributed as du
    from engine.checkpoint import CheckpointError, load_checkpoint
    from engine.hub import resolve_checkpoint
    from engine.tasks import build_task
    from engine.threads import set_threads
    from models.weights import checkpoint_weights, load_weights
    import data as data_lib
    task = build_task(cfg)
    info = du.init_distributed(cfg.dist, cfg.runtime.device)
    set_threads(cfg.runtime.threads)  # as training: runtime.threads, OMP_NUM_THREADS, or cores per process
    dataset = task.build_dataset("val")
    loader = data_lib.build_loader(dataset, cfg.data, "val", max(cfg.eval.batch_size // info.world_size, 1),
                                   info.distributed, cfg.runtime.seed)
    transform = task.device_transform("val")
    if hasattr(transform, "to"):
        transform.to(info.device)
    if path is None:
        err = None
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
    full = state if state is not None else load_checkpoint(path)
    report = load_weights(model, checkpoint_weights(full, ema, path), name=path, fix=fix)
    model.to(info.device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    amp = cfg.train.amp if info.device.type == "cuda" else "none"
    _stop.evaluating = True  # from here a stop signal is noticed between batches (not inside a worker's fork)
    metrics = task.evaluate(model, loader, info.device, transform, amp, results_path, on_batch=_stop.check)
    return metrics, path, len(dataset), report, full, task


def _weights_fix(args):
    if args.config is None:
        return ("its stored config builds another model (check the overrides given); give the config it was "
                "trained with: ./test.sh CONFIG CHECKPOINT")
    return (f"evaluate it with the config it was trained with: drop {args.config} to use the config stored in "
            f"the checkpoint (./test.sh {args.checkpoint}), or give the matching CONFIG")


def _report_differences(args, state, cfg):
    """Print one warning line per key where evaluation differs from the checkpoint's stored config."""
    stored = state.get("config") if isinstance(state, dict) else None
    if not isinstance(stored, dict):
        return []
    overridden = {o.partition("=")[0] for o in args.overrides}
    lines = []
    for key, old, new in eval_differences(stored, cfg):
        section, _, names = key.rpartition(".")
        keys = {f"{section}.{name}" for name in names.split("/")}  # data.mean/normalize: either key sets it
        why = "an explicit override" if keys & overridden or args.config is None else f"from {args.config}"
        lines.append(f"warning: {key}: {old} in the checkpoint's config, {new} used here ({why})")
    return lines


class _Stop:
    """A stop signal: raised at once during setup (as tools/train.py), after the current batch while evaluating."""
    evaluating, signum = False, None

    def handle(self, signum, frame):
        if not self.evaluating:
            stop_now(signum, frame)
        self.signum = self.signum or signum

    def check(self, batch):
        if self.signum is not None:
            raise StoppedBeforeStart(signal.Signals(self.signum).name)


_stop = _Stop()


def run(argv=None):
    previous = {s: signal.signal(s, _stop.handle) for s in STOP_SIGNALS}
    try:
        code = _run(argv)
    except StoppedBeforeStart as e:  # stop signals stay ignored: the process ends now
        if (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0":  # every rank got it
            print(f"stopped by {e.args[0]}: the evaluation was interrupted and wrote nothing; run the same command "
                  "again", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    for s, handler in previous.items():
        signal.signal(s, handler)
    return code


def _run(argv):
    from core.fields import ConfigError
    from data.errors import worker_lost
    from engine import distributed as du
    from engine.checkpoint import CheckpointError, atomic_write
    from engine.config import load_config
    from engine.relay import report_error
    from models.weights import WeightsMismatchError
    args = parse_args(argv)
    code, err = EXIT_OK, None
    try:
        if args.config is None:
            cfg, path, state = config_from_checkpoint(args.checkpoint, args.overrides)
        else:
            cfg, path, state = load_config(args.config, args.overrides), None, None
        start = time.time()
        detections = None
        if cfg.get("task") == "detection":  # COCO result entries beside the metrics: detections_<name>.json
            out = result_path(args, cfg, path or args.checkpoint)
            detections = os.path.join(os.path.dirname(out), "detections_" + os.path.basename(out)[len("test_"):]) \
                if os.path.basename(out).startswith("test_") else os.path.splitext(out)[0] + "_detections.json"
        metrics, path, size, report, state, task = evaluate_checkpoint(cfg, args.checkpoint, args.ema, path, state,
                                                                       _weights_fix(args), detections)
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
        differences = _report_differences(args, state, cfg)
        for line in differences:
            print(line, file=sys.stderr)
        out = result_path(args, cfg, path)
        record = {"config": args.config or f"stored in {path}", "checkpoint": args.checkpoint,
                  "path": os.path.abspath(path), "ema": args.ema, "weights": f"{report.source}: {report.summary()}",
                  "differences": [d[len("warning: "):] for d in differences], **metrics,
                  "dataset_size": size, "world_size": du.get_world_size(), "time_s": round(time.time() - start, 2)}
        shown = args.checkpoint if os.path.abspath(args.checkpoint) == os.path.abspath(path) else \
            f"{args.checkpoint} ({path})"
        if "table" in metrics:
            print(metrics.pop("table"))
        print(f"{shown}: {task.val_line(metrics)} ({metrics['count']}/{size} images)")
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
