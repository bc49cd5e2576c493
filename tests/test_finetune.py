"""Fine-tuning: 1000-class checkpoints (torchvision's, ours) onto a 3-class image folder through the real trainer.

Checks that the backbone loads, the classifier starts fresh and the report names exactly the skipped keys;
that frozen stages and norm_eval keep their weights and running statistics; that the backbone's LR stays
train.lr x backbone_lr_mult at every step, across a resume; and the one-line refusals.
"""
import copy
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from core.fields import ConfigError
from engine.checkpoint import load_checkpoint
from engine.config import from_tree
from engine.optim import group_lrs, lr_factor
from engine.trainer import Trainer
from models import build_model
from models.finetune import frozen_modules, is_batch_norm
from models.mobilenetv2 import SETTINGS
from models.weights import WeightsMismatchError, load_weights
from tests.engine_helpers import run_train_sh

CLASSES = ("cat", "dog", "owl")
CE20 = {"backbone": "cifar_resnet20", "plugins": [{"type": "ce", "stages": [1, 2, 3], "stem": True}]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 3-class ImageFolder tree (4 train + 2 val images per class, PNG and JPEG, 40x40 and 48x36)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c, name in enumerate(CLASSES):
            os.makedirs(root / split / name)
            for i in range(n):
                img = rng.integers(0, 256, (40, 40, 3) if i % 2 else (36, 48, 3), dtype=np.uint8)
                img[..., c] = 255 - img[..., c] // 4  # a class cue the head can pick up
                Image.fromarray(img).save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A torchvision resnet18 state dict (1000 classes) and our training checkpoint of a 1000-class CE-ResNet-20."""
    import torchvision
    t = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), t / "resnet18_torchvision.pth")
    cfg = from_tree({"model": {**CE20, "num_classes": 1000},
                     "data": {"dataset": "synthetic", "input_size": 16, "workers": 0, "pin_memory": False,
                              "synthetic": {"train_size": 8, "val_size": 4}},
                     "train": {"epochs": 1, "batch_size": 8, "lr": 0.1},
                     "eval": {"batch_size": 4},
                     "runtime": {"work_dir": str(t / "ours"), "device": "cpu", "tensorboard": False}})
    ours = Trainer(cfg).train()["checkpoint"]
    return {"torchvision": str(t / "resnet18_torchvision.pth"), "ours": ours}


def ft_cfg(work_dir, folder, model, *overrides, epochs=2):
    tree = {
        "model": {**model, "num_classes": 3},
        "data": {"dataset": "imagenet_folder", "root": str(folder), "input_size": 32, "workers": 0,
                 "pin_memory": False},
        "train": {"epochs": epochs, "batch_size": 4, "lr": 0.05, "schedule": "cosine", "warmup_epochs": 0.5,
                  "min_lr": 0.001, "weight_decay": 1e-4, "wd_exempt": ["norm", "bias"]},
        "eval": {"batch_size": 6},
        "runtime": {"work_dir": str(work_dir), "device": "cpu", "log_interval": 1, "tensorboard": False,
                    "keep_last": 1},
    }
    return from_tree(tree, list(overrides))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def records(work_dir, kind):
    return [r for r in map(json.loads, open(os.path.join(work_dir, "metrics.jsonl"))) if r["kind"] == kind]


# ----------------------------------------------------------------------------- the test

def test_finetune_1000_class_torchvision_checkpoint_on_3_class_folder_trains_and_evaluates(tmp_path, folder,
                                                                                          checkpoints):
    from tools import test as test_tool
    work = tmp_path / "run"
    cfg = ft_cfg(work, folder, {"backbone": "resnet18", "pretrained": checkpoints["torchvision"]},
                 "train.backbone_lr_mult=0.1")
    t = Trainer(cfg)
    source = torch.load(checkpoints["torchvision"])
    start = snapshot(t.model)
    backbone = [k for k in start if not k.startswith("fc.")]
    assert len(backbone) == len(source) - 2
    for k in backbone:  # every backbone tensor is the checkpoint's
        assert torch.equal(start[k], source[k]), k
    torch.manual_seed(cfg.runtime.seed)  # the classifier is the fresh one a 3-class model starts with
    fresh = build_model(cfg.model).state_dict()
    assert start["fc.weight"].shape == (3, 512)
    assert torch.equal(start["fc.weight"], fresh["fc.weight"]) and torch.equal(start["fc.bias"], fresh["fc.bias"])
    path, report = t.pretrained
    assert report.skipped == ["fc.weight", "fc.bias"] and report.loaded == len(source) - 2
    result = t.train()

    assert result["status"] == "done" and t.step == 6 and os.path.isfile(result["checkpoint"])
    train = records(work, "train")
    assert len(train) == 6 and all(np.isfinite(r["loss"]) for r in train)
    assert not torch.equal(t.model.fc.weight, start["fc.weight"]) and not torch.equal(t.model.conv1.weight,
                                                                                   start["conv1.weight"])
    # the report: in log.txt and metrics.jsonl, every skipped key with its reason
    (init,) = records(work, "pretrained")
    assert init["skipped"] == ["fc.weight", "fc.bias"] and init["loaded"] == len(source) - 2
    log = (work / "log.txt").read_text()
    assert ("skipped 2: fc.weight (classifier re-initialised: checkpoint [1000, 512], model [3, 512]); fc.bias "
            "(classifier re-initialised: checkpoint [1000], model [3])") in log
    # evaluates: tools.test on the fine-tuned checkpoint with the run's config
    assert test_tool.run([str(work / "config.yaml"), result["checkpoint"]]) == 0
    out = json.load(open(work / f"test_{os.path.splitext(os.path.basename(result['checkpoint']))[0]}.json"))
    assert out["count"] == out["dataset_size"] == 6 and np.isfinite(out["loss"])
    assert out["top1"] == pytest.approx(result["metrics"]["top1"])


# ----------------------------------------------------------------------------- learning rates

def test_backbone_lr_is_lr_times_mult_at_every_step_and_after_resume(tmp_path, folder, checkpoints):
    over = ("train.backbone_lr_mult=0.25",)
    model = {**CE20, "pretrained": checkpoints["ours"]}
    seen = []

    def record(t):
        step = t.scheduler.step
        def logged():
            step()
            seen.append((t.scheduler.last_step, group_lrs(t.optimizer)))
        t.scheduler.step = logged
        seen.append((t.scheduler.last_step, group_lrs(t.optimizer)))

    first = Trainer(ft_cfg(tmp_path, folder, model, *over))
    names = {g["name"] for g in first.optimizer.param_groups}
    assert names == {"head", "backbone"} and len(first.optimizer.param_groups) == 4  # x decay / no decay
    record(first)
    orig = first.validate
    first.validate = lambda: (first.stop.request(), orig())[1]
    assert first.train()["status"] == "preempted" and first.step == 3
    again = Trainer(ft_cfg(tmp_path, folder, model, *over))
    assert again.step == 3 and again.pretrained is None  # resumed, not re-initialised
    record(again)
    assert again.train()["status"] == "done" and again.step == 6
    steps = [s for s, _ in seen]
    assert steps == [0, 1, 2, 3, 3, 4, 5, 6]
    tr = again.cfg.train
    for step, lrs in seen:
        assert lrs["head"] == pytest.approx(0.05 * lr_factor(step, tr, 3), rel=1e-12), step
        assert lrs["backbone"] == pytest.approx(0.25 * lrs["head"], rel=1e-12), step
    assert seen[1][1]["backbone"] != seen[2][1]["backbone"]  # the schedule does move it
    assert "lr_backbone" in records(tmp_path, "train")[0]


def test_groups_unchanged_without_mult_and_split_by_decay_with_it():
    model = build_model({"backbone": "resnet18", "num_classes": 3})
    from engine.optim import build_optimizer
    base = {"weight_decay": 1e-4, "wd_exempt": ["norm", "bias"], "lr": 0.1, "momentum": 0.9, "nesterov": False}
    plain = build_optimizer(model, base).param_groups
    assert [(g["weight_decay"], g["lr"], "name" in g) for g in plain] == [(1e-4, 0.1, False), (0.0, 0.1, False)]
    groups = build_optimizer(model, {**base, "backbone_lr_mult": 0.1}).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    got = {(g["name"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert got[("head", 1e-4)] == ["fc.weight"] and got[("head", 0.0)] == ["fc.bias"]
    assert "conv1.weight" in got[("backbone", 1e-4)] and "bn1.weight" in got[("backbone", 0.0)]
    assert {g["name"]: g["lr"] for g in groups} == {"head": 0.1, "backbone": 0.1 * 0.1}
    assert sum(len(g["params"]) for g in groups) == sum(len(g["params"]) for g in plain)


# ----------------------------------------------------------------------------- freezing and norm_eval

def test_frozen_stages_keep_weights_and_running_stats(tmp_path, folder, checkpoints):
    cfg = ft_cfg(tmp_path, folder, {"backbone": "resnet18", "pretrained": checkpoints["torchvision"],
                                    "frozen_stages": 2}, epochs=1)
    t = Trainer(cfg)
    before = snapshot(t.model)
    frozen = ("conv1.", "bn1.", "layer1.", "layer2.")
    assert all(p.requires_grad == (not n.startswith(frozen)) for n, p in t.model.named_parameters())
    t.train()
    after = snapshot(t.model)
    t.net.train()  # as every epoch does: the frozen part stays in eval mode
    assert not any(m.training for m in frozen_modules(t.model, 2)) and t.model.layer3.training
    for k in before:
        if k.startswith(frozen):
            assert torch.equal(before[k], after[k]), k  # weights, BN running stats and counters
    for k in ("layer3.0.conv1.weight", "layer3.0.bn1.running_mean", "layer4.1.bn2.weight", "fc.weight"):
        assert not torch.equal(before[k], after[k]), k


def test_norm_eval_keeps_bn_and_ce_statistics_but_trains_their_affine(tmp_path, folder, checkpoints):
    cfg = ft_cfg(tmp_path, folder, {**CE20, "pretrained": checkpoints["ours"], "norm_eval": True}, epochs=1)
    t = Trainer(cfg)
    before = snapshot(t.model)
    t.train()
    t.net.train()
    norms = [m for m in t.model.modules() if is_batch_norm(m)]
    assert len(norms) > 19 and not any(m.training for m in norms) and t.model.training
    after = snapshot(t.model)
    stats = [k for k in before if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "running_wm",
                                                           "running_scale", "num_batches_tracked")]
    assert any("running_wm" in k for k in stats)  # CE's statistics are among them
    for k in stats:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["layer1.0.bn1.weight"], after["layer1.0.bn1.weight"])


def test_stage_maps_freeze_exactly_the_stem_and_the_first_stages():
    mb = build_model({"backbone": "mobilenet_v2", "num_classes": 3, "backbone_args": {"width_mult": 0.25},
                      "frozen_stages": 3})
    last = 1 + sum(n for _, _, n, _ in SETTINGS[:3])  # features[0] is the stem
    for name, p in mb.named_parameters():
        index = int(name.split(".")[1]) if name.startswith("features.") else None
        assert p.requires_grad == (index is None or index >= last), name
    ce = build_model({**CE20, "num_classes": 3, "frozen_stages": 0})
    stem = {n for n, p in ce.named_parameters() if not p.requires_grad}
    assert stem and all(n.startswith(("conv1.", "bn1.", *ce.stem_plugins)) for n in stem)
    assert any(not n.startswith(("conv1.", "bn1.")) for n in stem)  # the stem CE is part of the stem
    none = build_model({**CE20, "num_classes": 3, "frozen_stages": -1})
    assert all(p.requires_grad for p in none.parameters())


@pytest.mark.parametrize("backbone", ["resnet18", "cifar_resnet20", "mobilenet_v2"])
def test_freezing_survives_a_pickled_whole_model_and_a_deepcopy(backbone):
    """torch.save(model) / torch.load: the freeze used to live in an instance-bound train(), which pickling
    dropped, so the loaded model's frozen BNs went back to train mode and moved their statistics."""
    model = build_model({"backbone": backbone, "num_classes": 3, "frozen_stages": 1, "norm_eval": False})
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for m in (model, torch.load(buf, weights_only=False), copy.deepcopy(model)):
        m.train()
        stem, stage1, stage2 = m.stem_and_stages()[:3]
        assert not any(x.training for part in (stem, stage1) for x in part), backbone
        assert all(x.training for x in stage2) and m.training
    normed = copy.deepcopy(build_model({**CE20, "num_classes": 3, "norm_eval": True})).train()
    assert not any(x.training for x in normed.modules() if is_batch_norm(x)) and normed.layer1.training


# ----------------------------------------------------------------------------- what is loaded, what is refused

def test_head_loads_when_it_fits_and_is_reinitialised_when_absent(checkpoints):
    state = torch.load(checkpoints["ours"], weights_only=False)
    same = build_model({**CE20, "num_classes": 1000})
    report = load_weights(same, load_checkpoint(checkpoints["ours"]), new_head=True)
    assert report.skipped == [] and report.summary() == f"all {report.loaded} tensors matched"
    assert torch.equal(same.fc.weight, state["model"]["fc.weight"])
    headless = {k: v for k, v in state["model"].items() if not k.startswith("fc.")}
    report = load_weights(build_model({**CE20, "num_classes": 3}), headless, new_head=True)
    assert report.skipped == ["fc.weight", "fc.bias"] and "fc.bias (classifier re-initialised: not in the " \
        "checkpoint, model [3])" in report.summary()
    with pytest.raises(WeightsMismatchError, match="2 of the wrong shape"):  # tools.test stays strict
        load_weights(build_model({**CE20, "num_classes": 3}), load_checkpoint(checkpoints["ours"]))
    report = load_weights(build_model({**CE20, "num_classes": 1000}), load_checkpoint(checkpoints["ours"]), new_head=True,
                          ignore=("fc.*",))
    assert report.skipped == ["fc.weight", "fc.bias"] and "fc.weight (model.pretrained_ignore)" in report.summary()


@pytest.mark.parametrize("model, source, message", [
    ({"backbone": "resnet34"}, "torchvision",
     r"do not fit the model: \d+ missing \(layer1\.2\.conv1\.weight.*build the checkpoint's architecture"),
    ({"backbone": "cifar_resnet20"}, "ours",
     r"do not fit the model \(it was trained as cifar_resnet20 with ce\): \d+ unexpected \(.*ce"),
    ({"backbone": "mobilenet_v2"}, "torchvision", r"do not fit the model: \d+ missing .*\d+ unexpected"),
])
def test_another_architecture_is_refused_in_one_line_writing_nothing(tmp_path, capsys, folder, checkpoints,
                                                                      model, source, message):
    from core.config import dump
    from tools import train as train_tool
    cfg_path = tmp_path / "ft.yaml"
    dump(ft_cfg(tmp_path / "work", folder, {**model, "pretrained": checkpoints[source]}), str(cfg_path))
    assert train_tool.run([str(cfg_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: weights in "), err
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("override, message", [
    ("model.frozen_stages=5", r"model\.frozen_stages=5 is out of range for resnet18: -1 \(nothing\), 0 \(the "
                              r"stem\) or 1\.\.4"),
    ("model.frozen_stages=-2", r"model\.frozen_stages=-2 must be >= -1"),
    ("train.backbone_lr_mult=-0.1", r"train\.backbone_lr_mult=-0\.1 must be > 0 .*use model\.frozen_stages"),
    ("train.backbone_lr_mult=0", r"train\.backbone_lr_mult=0 must be > 0"),
    ("model.norm_eval=2", r"model\.norm_eval"),
])
def test_bad_finetune_settings_are_refused_in_one_line(tmp_path, folder, override, message):
    with pytest.raises(ConfigError, match=message) as e:
        ft_cfg(tmp_path, folder, {"backbone": "resnet18"}, override)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"out of range for cifar_resnet20: .* or 1\.\.3"):
        ft_cfg(tmp_path, folder, {"backbone": "cifar_resnet20"}, "model.frozen_stages=4")


def test_an_original_repository_checkpoint_fine_tunes_with_a_new_head():
    from tests.test_ed import ednet_state_dict
    torch.manual_seed(0)
    theirs = ednet_state_dict((3, 4, 6, 3), base=64, expansion=4, cardinality=1, se=False)  # ED-Net's ED50
    checkpoint = {"epoch": 100, "arch": "ED50", "state_dict": {"module." + k: v for k, v in theirs.items()}}
    model = build_model({"backbone": "resnet50", "num_classes": 3, "frozen_stages": 1,
                         "plugins": [{"type": "ed", "position": "parallel", "reduction": 4}]})
    report = load_weights(model, checkpoint, new_head=True)
    assert report.source == "ednet" and report.skipped == ["fc.weight", "fc.bias"]
    assert report.loaded == len(theirs) - 2
    ours = model.layer4[2].ed.decoder_conv.weight
    assert torch.equal(ours, theirs["layer4.layer4_block_2.decoder.decoder_conv.weight"])


def test_the_finetuning_page_runs_its_snippet_and_names_real_keys_and_configs(tmp_path):
    import re
    from engine.config import load_config
    from engine.schema import describe
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    section = open(os.path.join(root, "docs", "finetuning.md"), encoding="utf-8").read()
    keys = re.findall(r"^\| `([a-z_.]+)` \|", section, re.M)
    assert len(keys) == 5 and set(keys) <= {k for k, _, _ in describe()}
    configs = set(re.findall(r"configs/finetune/\w+\.yaml", section))
    assert len(configs) == 2 and all(load_config(os.path.join(root, c)) for c in configs)
    snippet = re.search(r"python - <<'PY'.*?\n(.*?)\nPY\n", section, re.S).group(1)
    exec(snippet.replace("work_dirs/digits3", str(tmp_path)), {})
    counts = {split: sum(len(os.listdir(tmp_path / split / c)) for c in ("0-2", "3-5", "6-9"))
              for split in ("train", "val")}
    assert counts == {"train": 1437, "val": 360}  # as the page says


def test_list_file_dataset_fine_tunes_too(tmp_path, folder, checkpoints):
    lines = {split: [f"{name}/{f} {c}" for c, name in enumerate(CLASSES)
                     for f in sorted(os.listdir(folder / split / name))] for split in ("train", "val")}
    for split, rows in lines.items():
        (tmp_path / f"{split}.txt").write_text("\n".join(rows) + "\n")
    cfg = ft_cfg(tmp_path / "run", folder, {**CE20, "pretrained": checkpoints["ours"], "frozen_stages": 2},
                 "data.dataset=imagenet_list", f"data.train_list={tmp_path / 'train.txt'}",
                 f"data.val_list={tmp_path / 'val.txt'}", epochs=1)
    t = Trainer(cfg)
    assert t.pretrained[1].skipped == ["fc.weight", "fc.bias"] and len(t.train_set) == 12
    result = t.train()
    assert result["status"] == "done" and result["metrics"]["count"] == 6 and np.isfinite(result["metrics"]["loss"])


# ----------------------------------------------------------------------------- the path users run

def test_finetune_through_train_sh_two_processes_workers_syncbn_bf16_channels_last(tmp_path, folder, checkpoints):
    # fine-tuning as users launch it: ./train.sh with 2 gloo processes, data workers, SyncBN, bf16 autocast and
    # channels_last; the frozen stem + stage 1 (weights and BN statistics) must come out as the checkpoint's,
    # norm_eval must keep every other BN's statistics too, and the report must reach log.txt
    work = tmp_path / "run"
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"""
model: {{backbone: resnet18, num_classes: 3, pretrained: {checkpoints['torchvision']}, frozen_stages: 1,
        norm_eval: true}}
data: {{dataset: imagenet_folder, root: {folder}, input_size: 32, workers: 2}}
train: {{epochs: 1, batch_size: 4, lr: 0.05, backbone_lr_mult: 0.1, amp: bf16, channels_last: true, sync_bn: true}}
eval: {{batch_size: 6}}
runtime: {{device: cpu, work_dir: {work}, log_interval: 1, tensorboard: false}}
""")
    r = run_train_sh(cfg, 2, cwd=tmp_path)
    out = r.out
    assert r.returncode == 0, out[-3000:]
    assert "world size 2 (gloo)" in out and "mixed precision: bf16 autocast on cpu" in out, out[-3000:]
    assert "fc.weight (classifier re-initialised: checkpoint [1000, 512], model [3, 512])" in \
        (work / "log.txt").read_text()
    source = torch.load(checkpoints["torchvision"], weights_only=True)
    final = torch.load(work / "checkpoints" / "epoch_001.pth", weights_only=True)["model"]
    frozen = [k for k in source if k.split(".")[0] in ("conv1", "bn1", "layer1")]
    stats = [k for k in source if k.endswith(("running_mean", "running_var"))]
    assert frozen and stats
    for k in frozen + stats:  # frozen weights, and every BN's statistics (norm_eval), as in the checkpoint
        assert torch.equal(final[k], source[k]), k
    assert not torch.equal(final["layer4.1.conv2.weight"], source["layer4.1.conv2.weight"])  # the rest trains
    assert final["fc.weight"].shape == (3, 512)
