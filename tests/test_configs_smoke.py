"""Every config in configs/ (except _base_ pieces) loads, and one config per distinct step trains one step.

Every config loads, which builds its model at full width on the meta device (test_config_loads_as_written).
Training one step on tiny synthetic data checks that a model, optimizer, schedule and engine options fit
together; the data section is replaced by a 2-image synthetic set at 32x32 (a detection config: the
generated COCO-format shapes set, data/shapes.py, at 64 pixels) and the run is cut after one optimizer step
(runtime.max_steps=1, no checkpoint), so this checks the code paths, not the data paths (which point at
datasets that CI does not have). The train keys that TINY overrides (batch size, AMP, compile, SyncBN, ...)
cannot tell configs apart, and numbers only matter as zero or not (a schedule's milestones, label smoothing):
so one config per distinct (blocks, detector, recipe) triple trains its step, the smallest backbone of the
group (the CIFAR-10 and CIFAR-100 configs of one row, or ResNet-50 and -101 of one recipe, take the same
step). Every backbone x block combination also trains a step in tests/test_models.py.
"""
import glob
import json
import math
import os
import re

import pytest

from core.config import read_tree

from engine.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"),
                                                             recursive=True)
                 if "_base_" not in os.path.relpath(p, os.path.join(ROOT, "configs")).split(os.sep))

TINY = ["data.dataset=synthetic", "data.root=null", "data.num_classes=null", "data.input_size=32",
        "data.eval_resize=null", "data.workers=0", "data.synthetic.train_size=2", "data.synthetic.val_size=2",
        "data.synthetic.num_classes=null", "train.batch_size=2", "train.accum_steps=1", "train.epochs=1",
        "train.warmup_epochs=0", "train.amp=none", "train.compile=false", "train.sync_bn=false",
        "eval.batch_size=2", "eval.interval=0", "eval.final=false", "eval.best_metric=top1",
        "runtime.device=cpu", "runtime.max_steps=1", "runtime.tensorboard=false", "runtime.resume_from=null",
        "model.pretrained=null"]
DETECTION_TINY = [o for o in TINY if not o.startswith(("data.", "eval.best_metric"))] + [
    "data.workers=0", "detector.num_classes=3", "detector.min_size=64", "detector.max_size=96"]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    from data.shapes import make_shapes_coco
    return make_shapes_coco(str(tmp_path_factory.mktemp("shapes")), {"train2017": 4, "val2017": 2}, 48)




TINY_TRAIN = {o.split("=")[0][len("train."):] for o in TINY if o.startswith("train.")}


def _shape(value):
    """A recipe value as the code paths see it: strings and flags as they are, numbers as zero or not."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shape(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 0 if value == 0 else "n"
    return value


def step_key(path):
    """What one tiny training step can tell apart: the blocks, the detector and the recipe's shape."""
    tree = read_tree(os.path.join(ROOT, path))
    model = tree.get("model", {})
    conv = dict(model.get("conv") or {})
    blocks = [conv.get("type", "plain"), conv.get("mwe")] + [(p["type"], p.get("variant")) for p in
                                                            model.get("plugins") or []]
    detector = (tree.get("detector") or {}).get("type") if tree.get("task") == "detection" else None
    recipe = {k: v for k, v in (tree.get("train") or {}).items() if k not in TINY_TRAIN}
    return json.dumps([blocks, detector, _shape(recipe)], sort_keys=True, default=str)


def _size(path):
    """Smaller first: the numbers in the backbone's name (cifar_resnet20 < 110, resnet50 < 101, x0_5 < x1_0)."""
    backbone = str(read_tree(os.path.join(ROOT, path)).get("model", {}).get("backbone", ""))
    return tuple(int(n) for n in re.findall(r"\d+", backbone)), path


def _smallest_per_key(paths):
    groups = {}
    for p in paths:
        groups.setdefault(step_key(p), []).append(p)
    return sorted(min(g, key=_size) for g in groups.values())


STEPPED = _smallest_per_key(CONFIGS)


def test_configs_found():
    assert os.path.join("configs", "default.yaml") in CONFIGS


def expected_classes(path, dataset):
    """The class count a config's dataset has (None where the user's data decides)."""
    return {"cifar10": 10, "cifar100": 100}.get(dataset) or (1000 if path.startswith("configs/imagenet/") else None)


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_as_written(path):
    cfg = load_config(os.path.join(ROOT, path))  # validates every section and builds the model on the meta device
    expected = expected_classes(path, cfg.data.dataset)
    if expected is not None:  # not checked at load: a CIFAR-100 config with 10 classes fails only once data loads
        assert cfg.model.num_classes == expected, (cfg.data.dataset, cfg.model.num_classes)


def test_a_wrong_class_count_is_caught():
    cfg = load_config(os.path.join(ROOT, "configs/cifar/cifar100/resnet20.yaml"), ["model.num_classes=10"])
    assert cfg.model.num_classes != expected_classes("configs/cifar/cifar100/resnet20.yaml", cfg.data.dataset)


def test_every_config_shares_the_step_of_a_stepped_config():
    stepped = {step_key(p) for p in STEPPED}
    assert len(stepped) == len(STEPPED) and all(step_key(p) in stepped for p in CONFIGS)
    assert not [p for p in STEPPED if "/cifar100/" in p]  # a CIFAR-100 row takes its CIFAR-10 twin's step
    assert "configs/cifar/cifar10/ce_resnet20.yaml" in STEPPED and "configs/cifar/cifar10/ce_resnet110.yaml" \
        not in STEPPED
    assert step_key("configs/cifar/cifar10/ce_resnet110.yaml") == step_key("configs/cifar/cifar100/ce_resnet110.yaml")
    assert step_key("configs/ablation/ce_resnet20.yaml") != step_key("configs/ablation/se_resnet20.yaml")


@pytest.mark.parametrize("path", STEPPED)
def test_config_trains_one_step(path, tmp_path, monkeypatch, request):
    import torch
    from engine.trainer import Trainer
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    tiny = TINY
    if read_tree(os.path.join(ROOT, path)).get("task") == "detection":
        tiny = DETECTION_TINY + [f"data.root={request.getfixturevalue('shapes_root')}"]
    cfg = load_config(os.path.join(ROOT, path), tiny + [f"runtime.work_dir={tmp_path}"])
    t = Trainer(cfg)
    before = {k: v.clone() for k, v in t.model.state_dict().items() if v.is_floating_point()}
    result = t.train()
    assert result["status"] == "max_steps" and t.step == 1
    after = t.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before), "one SGD step changed nothing"
    assert math.isfinite(t.optimizer.param_groups[0]["lr"])
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))
