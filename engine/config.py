"""The run's config: the YAML loader of ``core.config`` checked against every section's schema.

The schema is assembled in ``engine/schema.py`` from the sections' own (``models/schema.py``,
``data/schema.py``, the engine's); after the per-key checks come the checks across sections:
the model builds with its blocks, the input size suits the backbone, the engine's cross-checks,
and the paths users type (``~``; ``w/`` is the same run as ``w``; relative to where ./train.sh
was started).
"""
import os

from core.config import build, read_tree
from data.recipe import build_recipe
from engine.schema import cross_check, get_schema
import models


def _check_model(tree):
    models.validate_model_cfg(tree["model"])
    models.check_input_size(tree["model"], build_recipe(tree["data"]).input_size)


def _user_paths(tree):
    rt = tree["runtime"]
    for key in ("work_dir", "resume_from"):
        if isinstance(rt.get(key), str) and rt[key]:
            rt[key] = os.path.expanduser(rt[key])
    if isinstance(rt.get("work_dir"), str) and rt["work_dir"]:
        rt["work_dir"] = os.path.normpath(rt["work_dir"])


CHECKS = (_check_model, cross_check, _user_paths)


def from_tree(tree, overrides=(), where="config"):
    """Validate an already-merged run config tree (plus ``key=value`` overrides) into a Config."""
    return build(tree, get_schema(), overrides, CHECKS, where)


def load_config(path, overrides=()):
    """Read a run config file (with its ``_base_`` files), apply ``overrides`` and check it whole."""
    return from_tree(read_tree(path), overrides, where=os.path.relpath(path))


def default_work_dir(config_path):
    """``work_dirs/<path under configs/ without .yaml>`` (configs/imagenet/cenet/resnet50.yaml ->
    work_dirs/imagenet/cenet/resnet50), so that recipes of the same file name never share a run; a config
    outside any ``configs/`` folder gets ``work_dirs/<file name>``."""
    parts = os.path.normpath(os.path.abspath(os.path.splitext(config_path)[0])).split(os.sep)
    if "configs" in parts[:-1]:
        last = len(parts) - 1 - parts[::-1].index("configs", 1)  # the innermost configs/ folder
        return os.path.join("work_dirs", *parts[last + 1:])
    return os.path.join("work_dirs", parts[-1])
