"""Training state: seeding, the full state a checkpoint holds, and resuming from it.

A checkpoint holds model, optimizer, scheduler, AMP scaler, EMA, epoch, step,
iter_in_epoch, best_metric, the resolved config, and per-rank RNG states both
now and at the start of the epoch (``rng_epoch_start``: the data loader is
re-created from it on a mid-epoch resume, so workers see what they would have).
Resuming refuses a checkpoint of another architecture and warns about any other
changed config key (e.g. more epochs).
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


def class_names(dataset):
    """The dataset's class names (index = label) as strings, or None when it has none (synthetic, list files).
    Stored as the checkpoint's ``classes`` for tools.predict and tools.deploy (data.preprocess)."""
    classes = getattr(dataset, "classes", None)
    return [str(c) for c in classes] if classes else None


class TrainerState:
    """The Trainer's part that reads and writes its state: what a checkpoint holds, resuming from one, and
    starting from ``model.pretrained`` (mixed into ``engine.trainer.Trainer``)."""

    def state_dict(self):
        """Everything needed to continue the run bit for bit (all ranks call it: RNG states are gathered)."""
        rng = self.stop.gather({"now": capture_rng_state(), "epoch_start": self.rng_epoch_start})
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "epoch": self.epoch, "step": self.step, "iter_in_epoch": self.iter_in_epoch,
                "rng": [r["now"] for r in rng], "rng_epoch_start": [r["epoch_start"] for r in rng],
                "config": self.cfg.to_dict(), "best_metric": self.best_metric,
                "classes": class_names(self.train_set)}

    def _resume_from_checkpoint(self):
        """Load the checkpoint to continue from (``runtime.resume_from``, else the work dir's latest), if any.

        With none, a new run starts (from ``model.pretrained`` when set). Refusals raise ConfigError.
        """
        rt = self.cfg.runtime
        path = rt.resume_from
        try:
            if path is not None:
                state = load_checkpoint(path)
            elif rt.auto_resume:
                state, path = self.ckpt.load_latest()
                if self.ckpt.skipped and self.dist.is_main:
                    self.log.warning("resuming from %s, the newest intact checkpoint; skipped %d newer: %s", path,
                                  len(self.ckpt.skipped), "; ".join(self.ckpt.skipped))
                found = self.ckpt.candidates()
                if state is None and found:
                    raise ConfigError(f"none of the {len(found)} checkpoints in {self.ckpt.dir} can be read (see the "
                                      f"warnings above); move them away, or set runtime.auto_resume=false to start over")
            else:
                state = None
            if state is None:
                if self.cfg.model.get("pretrained"):
                    self._load_pretrained(self.cfg.model.pretrained, self.cfg.model.get("pretrained_ignore", []))
                return
        except (CheckpointError, ValueError) as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        old = (state.get("config") if isinstance(state, dict) else None) or {}
        old_model, new_model = old.get("model") or {}, self.cfg.model.to_dict()
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
        changed = config_diff(old, self.cfg.to_dict()) if old else []
        if changed:
            self.log.warning("resuming with a changed config: %s", ", ".join(changed))
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"cannot resume from {path}: {str(e).splitlines()[0]}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            else:
                self.ema = ModelEMA(self.model, self.ema.decay, self.ema.every)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.iter_in_epoch = int(state.get("iter_in_epoch", 0))
        self.best_metric = state.get("best_metric")
        if self.dist.is_main:
            self.ckpt.recover_best(self.best_metric)
        old_ipe = state["scheduler"].get("iters_per_epoch", self.iters_per_epoch)
        if old_ipe != self.iters_per_epoch:
            if self.iter_in_epoch:
                self.log.warning("steps per epoch changed (%d -> %d): restarting epoch %d from its first batch",
                              old_ipe, self.iters_per_epoch, self.epoch + 1)
                self.iter_in_epoch = 0
            # the schedule is defined over epochs: continue at this epoch's start counted in the new steps, so
            # warmup is not entered again and the schedule still ends exactly at train.epochs
            self.scheduler.load_state_dict({"last_step": self.epoch * self.iters_per_epoch})
            self.log.warning("steps per epoch changed (%d -> %d, e.g. train.batch_size changed): the LR schedule "
                          "continues from epoch %d", old_ipe, self.iters_per_epoch, self.epoch)
        rng = state.get("rng") or []
        if len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank])
            self.rng_epoch_start = (state.get("rng_epoch_start") or [None] * len(rng))[self.dist.rank]
        else:
            self.log.warning("checkpoint has RNG states for %d processes, this run has %d: RNG not restored",
                             len(rng), self.dist.world_size)
        self.log.info("resumed from %s %s, lr %.6g", path, self.where(), self.scheduler.get_last_lr()[0])

    def _load_pretrained(self, spec, ignore):
        """``model.pretrained``: start a new run from these weights (not used when resuming).

        A classifier that does not fit (another class count) keeps its fresh initialisation; any other
        mismatch is refused. ``self.pretrained`` holds (path, LoadReport) for the run's log.
        """
        from engine.hub import resolve_checkpoint
        from models.weights import load_weights
        err = path = None
        if self.dist.is_main:  # rank 0 downloads, the others then find it in the cache
            try:
                path = resolve_checkpoint(spec)
            except CheckpointError as e:
                err = str(e)
        err = self.stop.broadcast(err)
        if err is not None:
            raise CheckpointError(err)
        path = path or resolve_checkpoint(spec)
        report = load_weights(self.task.weights_target(self.model), load_checkpoint(path), ignore=tuple(ignore), new_head=True,
                              name=path)
        if self.ema is not None:
            self.ema = ModelEMA(self.model, self.ema.decay, self.ema.every)
        self.pretrained = (path, report)  # the trainer logs it once log.txt and metrics.jsonl exist
