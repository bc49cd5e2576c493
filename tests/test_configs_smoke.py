"""Every config in configs/ (except _base_ pieces) loads, and trains one step on tiny synthetic data.

The data section is replaced by a 2-image synthetic set at 32x32 (a detection config: the generated
COCO-format shapes set, data/shapes.py, at 64 pixels) and the run is
cut after one optimizer step (runtime.max_steps=1, no checkpoint), so this
checks that each experiment's model, optimizer, schedule and engine options fit
together, not its data paths (which point at datasets that CI does not have).
Every config loads (which builds its model on the meta device); one config per
distinct model structure and schedule trains its step (the CIFAR-10 and CIFAR-100
configs of one row differ only in their class count and data).
"""
import glob
import json
import math
import os

import pytest

from engine.config import load_config, read_tree

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




def step_keys(path):
    """What one training step can tell apart: the backbone and its blocks, and the recipe (train section)."""
    tree = read_tree(os.path.join(ROOT, path))
    model = tree.get("model", {})
    conv = dict(model.get("conv") or {})
    blocks = [conv.get("type", "plain"), conv.get("mwe")] + [(p["type"], p.get("variant")) for p in
                                                            model.get("plugins") or []]
    detector = (tree.get("detector") or {}).get("type") if tree.get("task") == "detection" else None
    return (json.dumps([model.get("backbone"), blocks, detector], default=str),
            json.dumps(tree.get("train", {}), sort_keys=True, default=str))


def _first_per_key(paths, i):
    return {step_keys(p)[i]: p for p in reversed(paths)}.values()


# one config per backbone x blocks combination and one per recipe (the rest only load)
STEPPED = sorted(set(_first_per_key(CONFIGS, 0)) | set(_first_per_key(CONFIGS, 1)))


def test_configs_found():
    assert os.path.join("configs", "default.yaml") in CONFIGS


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_as_written(path):
    cfg = load_config(os.path.join(ROOT, path))
    assert cfg.train.batch_size % cfg.train.accum_steps == 0


def test_a_cifar100_row_shares_the_step_of_its_cifar10_twin():
    assert "configs/cifar/cifar10/ce_resnet110.yaml" in STEPPED and "configs/cifar/cifar100/ce_resnet110.yaml" not in STEPPED


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
