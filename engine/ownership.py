"""A work directory belongs to the recipe that started it.

The run's resolved config is stored as ``<work_dir>/config.yaml``. A new run
over a work dir that holds checkpoints is refused when its model, data or
training recipe differs from that stored config (it would resume another
recipe's run, or prune its checkpoints and replace its ``best.pth``).
:data:`MAY_CHANGE` lists what legitimately changes between a run and its resume:
where and how it runs, not what it trains. ``runtime.resume_mismatch=allow``
overrides the refusal (each differing key is then logged).
"""
import fnmatch
import json
import os

import yaml

from core.fields import ConfigError

# Keys that may differ from the stored config.yaml when continuing a run (glob patterns over dotted keys).
MAY_CHANGE = (
    "runtime.*", "dist.*",  # where/how it runs: work_dir, device, logging, intervals, max_steps, timeouts
    "eval.interval", "eval.batch_size", "eval.final",  # when and in what batches it evaluates
    "data.root", "data.train_dir", "data.val_dir", "data.train_list", "data.val_list",  # the data moved
    "data.workers", "data.prefetch_factor", "data.pin_memory", "data.persistent_workers", "data.fast_decode",
    "data.verify_images", "data.skip_bad_images", "data.channels_last",  # how the data is loaded
    "train.epochs",  # a run may be extended (the schedule is defined over epochs)
    "train.batch_size",  # e.g. fewer GPUs: the schedule continues in epochs (engine.state.resume)
    "train.accum_steps", "train.amp", "train.channels_last", "train.compile", "train.compile_backend",
    "train.max_nonfinite",  # the same steps, computed another way
    "model.pretrained", "model.pretrained_ignore",  # only used to start a run, never on resume
)


def flatten(tree, prefix=""):
    """{'a': {'b': 1}} -> {'a.b': 1} (lists stay values)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_diff(stored, new):
    """``[(key, stored value, new value)]`` for keys in both configs that differ and may not change."""
    a, b = flatten(stored), flatten(new)
    return [(k, a[k], b[k]) for k in sorted(set(a) & set(b))
            if a[k] != b[k] and not any(fnmatch.fnmatchcase(k, pat) for pat in MAY_CHANGE)]


def _short(value, limit=40):
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_diff(diff, limit=4):
    """'model.backbone: resnet50 -> resnet101, train.lr: 0.1 -> 0.2 (+2 more)'."""
    parts = [f"{k}: {_short(x)} -> {_short(y)}" for k, x, y in diff[:limit]]
    return ", ".join(parts) + (f" (+{len(diff) - limit} more)" if len(diff) > limit else "")


def check_owner(work_dir, cfg_dict, has_checkpoints, allow=False):
    """Refuse (ConfigError) to continue ``work_dir`` when its stored config trained another recipe.

    Returns the differing keys (empty when none, or when there is nothing to continue); with
    ``allow`` they are returned instead of refused.
    """
    stored_path = os.path.join(work_dir, "config.yaml")
    if not has_checkpoints or not os.path.isfile(stored_path):
        return []
    try:
        with open(stored_path, encoding="utf-8") as f:
            stored = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []  # unreadable: the checkpoint's own config is still checked when resuming
    if not isinstance(stored, dict):
        return []
    diff = recipe_diff(stored, cfg_dict)
    if diff and not allow:
        raise ConfigError(
            f"work_dir {work_dir} holds a run of another recipe ({describe_diff(diff)}); pick another "
            f"runtime.work_dir, or set runtime.resume_mismatch=allow to continue that run with these changes")
    return diff
