"""Training state: seeding, the full state a checkpoint holds, and resuming from it.

A checkpoint holds model, optimizer, scheduler, AMP scaler, EMA, epoch, step,
iter_in_epoch, best_metric, the resolved config, and per-rank RNG states both
now and at the start of the epoch (``rng_epoch_start``: the data loader is
re-created from it on a mid-epoch resume, so workers see what they would have).
Resuming refuses a checkpoint of another architecture and warns about any other
changed config key (e.g. more epochs). The functions take the Trainer.
"""
import os
import random

import numpy as np
import torch

from core.fields import ConfigError
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.ema import ModelEMA

ARCH_KEYS = ("backbone", "num_classes", "backbone_args", "conv", "plugins")


def capture_rng_state():
    """Python, numpy, torch CPU and CUDA generator states as plain containers."""
    np_state = np.random.get_state()
    state = {'python': random.getstate(),
             'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    """Inverse of :func:`capture_rng_state` (missing entries are left alone)."""
    if 'python' in state:
        py = state['python']
        random.setstate((py[0], tuple(py[1]), py[2]))
    if 'numpy' in state:
        kind, key, *rest = state['numpy']
        key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
        np.random.set_state((kind, key.astype(np.uint32), *rest))
    if 'torch' in state:
        torch.set_rng_state(state['torch'].cpu())
    if state.get('cuda') is not None and torch.cuda.is_available():
        cuda = list(state['cuda'])[:torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def seed_everything(seed, deterministic=False, cudnn_benchmark=True):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark and not deterministic)


def config_diff(a, b, prefix=""):
    """Dotted keys whose values differ between two nested dicts."""
    keys = []
    for k in sorted(set(a) | set(b), key=str):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += config_diff(x, y, f"{prefix}{k}.")
        elif x != y:
            keys.append(f"{prefix}{k}")
    return keys


def training_state(t):
    """Everything needed to continue the run bit for bit (all ranks call it: RNG states are gathered)."""
    rng = t.stop.gather({"now": capture_rng_state(), "epoch_start": t.rng_epoch_start})
    return {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict() if t.scaler is not None else None,
            "ema": t.ema.state_dict() if t.ema is not None else None,
            "epoch": t.epoch, "step": t.step, "iter_in_epoch": t.iter_in_epoch,
            "rng": [r["now"] for r in rng], "rng_epoch_start": [r["epoch_start"] for r in rng],
            "config": t.cfg.to_dict(), "best_metric": t.best_metric, "classes": class_names(t.train_set)}


def class_names(dataset):
    """The dataset's class names (index = label) as strings, or None when it has none (synthetic, list files).
    Stored as the checkpoint's ``classes`` for tools.predict and tools.deploy (data.preprocess)."""
    classes = getattr(dataset, "classes", None)
    return [str(c) for c in classes] if classes else None


def resume(t):
    """Load the checkpoint to continue from (``runtime.resume_from``, else the work dir's latest), if any.

    With none, a new run starts (from ``model.pretrained`` when set). Refusals raise ConfigError.
    """
    rt = t.cfg.runtime
    path = rt.resume_from
    try:
        if path is not None:
            state = load_checkpoint(path)
        elif rt.auto_resume:
            state, path = t.ckpt.load_latest()
            if t.ckpt.skipped and t.dist.is_main:
                t.log.warning("resuming from %s, the newest intact checkpoint; skipped %d newer: %s", path,
                              len(t.ckpt.skipped), "; ".join(t.ckpt.skipped))
            found = t.ckpt.candidates()
            if state is None and found:
                raise ConfigError(f"none of the {len(found)} checkpoints in {t.ckpt.dir} can be read (see the "
                                  f"warnings above); move them away, or set runtime.auto_resume=false to start over")
        else:
            state = None
        if state is None:
            if t.cfg.model.get("pretrained"):
                load_pretrained(t, t.cfg.model.pretrained, t.cfg.model.get("pretrained_ignore", []))
            return
    except (CheckpointError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    old = (state.get("config") if isinstance(state, dict) else None) or {}
    old_model, new_model = old.get("model") or {}, t.cfg.model.to_dict()
    arch = [k for k in ARCH_KEYS if k in old_model and old_model[k] != new_model.get(k)]
    if arch:
        raise ConfigError(f"{path} was trained with a different model ({', '.join(arch)} differ); use a new "
                          f"runtime.work_dir or set runtime.auto_resume=false")
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "step") if not isinstance(state, dict)
               or k not in state]
    if missing:
        what = "weights only (e.g. a model-zoo or exported file)" if "optimizer" in missing else \
            f"no {', '.join(missing)}"
        raise ConfigError(f"cannot resume from {path}: it holds {what}, not a training checkpoint of this "
                          f"project; to start a new run from its weights set model.pretrained={path} instead")
    changed = config_diff(old, t.cfg.to_dict()) if old else []
    if changed:
        t.log.warning("resuming with a changed config: %s", ", ".join(changed))
    try:
        t.model.load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot resume from {path}: {str(e).splitlines()[0]}") from None
    t.scheduler.load_state_dict(state["scheduler"])
    if t.scaler is not None and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    if t.ema is not None:
        if state.get("ema"):
            t.ema.load_state_dict(state["ema"])
        else:
            t.ema = ModelEMA(t.model, t.ema.decay, t.ema.every)
    t.epoch, t.step = int(state["epoch"]), int(state["step"])
    t.iter_in_epoch = int(state.get("iter_in_epoch", 0))
    t.best_metric = state.get("best_metric")
    if t.dist.is_main:
        t.ckpt.recover_best(t.best_metric)
    old_ipe = state["scheduler"].get("iters_per_epoch", t.iters_per_epoch)
    if old_ipe != t.iters_per_epoch:
        if t.iter_in_epoch:
            t.log.warning("steps per epoch changed (%d -> %d): restarting epoch %d from its first batch",
                          old_ipe, t.iters_per_epoch, t.epoch + 1)
            t.iter_in_epoch = 0
        # the schedule is defined over epochs: continue at this epoch's start counted in the new steps, so
        # warmup is not entered again and the schedule still ends exactly at train.epochs
        t.scheduler.load_state_dict({"last_step": t.epoch * t.iters_per_epoch})
        t.log.warning("steps per epoch changed (%d -> %d, e.g. train.batch_size changed): the LR schedule "
                      "continues from epoch %d", old_ipe, t.iters_per_epoch, t.epoch)
    rng = state.get("rng") or []
    if len(rng) == t.dist.world_size:
        restore_rng_state(rng[t.dist.rank])
        t.rng_epoch_start = (state.get("rng_epoch_start") or [None] * len(rng))[t.dist.rank]
    else:
        t.log.warning("checkpoint has RNG states for %d processes, this run has %d: RNG not restored",
                         len(rng), t.dist.world_size)
    t.log.info("resumed from %s %s, lr %.6g", path, t.where(), t.scheduler.get_last_lr()[0])


def load_pretrained(t, spec, ignore):
    """``model.pretrained``: start a new run from these weights (not used when resuming).

    A classifier that does not fit (another class count) keeps its fresh initialisation; any other
    mismatch is refused. ``t.pretrained`` holds (path, LoadReport) for the run's log.
    """
    from engine.hub import resolve_checkpoint
    from models.weights import load_weights
    err = path = None
    if t.dist.is_main:  # rank 0 downloads, the others then find it in the cache
        try:
            path = resolve_checkpoint(spec)
        except CheckpointError as e:
            err = str(e)
    err = t.stop.broadcast(err)
    if err is not None:
        raise CheckpointError(err)
    path = path or resolve_checkpoint(spec)
    report = load_weights(t.task.weights_target(t.model), load_checkpoint(path), ignore=tuple(ignore), new_head=True,
                          name=path)
    if t.ema is not None:
        t.ema = ModelEMA(t.model, t.ema.decay, t.ema.every)
    t.pretrained = (path, report)  # the trainer logs it once log.txt and metrics.jsonl exist
