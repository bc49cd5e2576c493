"""docs/rows.md is generated from the configs; ShuffleNetV2 rows train and evaluate as users run them."""
import os
import re

import pytest
import torch

from tests.engine_helpers import ROOT, launch_env, run_train_sh
from tools import rows

CONFIGS = rows.paper_configs()


def _text(rel):
    with open(os.path.join(ROOT, "configs", rel), encoding="utf-8") as f:
        return f.read()


def test_every_paper_config_is_a_row_and_says_its_process_count():
    assert "imagenet/shufflenet/ce_shufflenet_v2_x0_5.yaml" in CONFIGS and "cifar/cifar100/we_resnet110.yaml" in CONFIGS
    assert {os.path.dirname(c) for c in CONFIGS} == set(rows.SOURCES)
    for rel in CONFIGS:
        assert rows.processes(rel) >= 1
        assert rows.schedule(rel), f"{rel} inherits no _base_/schedule_*.yaml"


def test_a_config_without_a_process_count_is_refused(tmp_path, monkeypatch):
    (tmp_path / "configs" / "imagenet").mkdir(parents=True)
    (tmp_path / "configs" / "imagenet" / "x.yaml").write_text("# no count\nmodel: {backbone: resnet18}\n")
    monkeypatch.setattr(rows, "ROOT", str(tmp_path))
    with pytest.raises(ValueError, match=r"configs/imagenet/x.yaml: say once in its comment how many processes"):
        rows.processes("imagenet/x.yaml")


def test_published_numbers_agree_with_the_config_comments():
    """Two transcriptions of each error rate (tools/rows.py and the config's comment) must agree."""
    for rel, (top1, source) in rows.PUBLISHED.items():
        assert rel in CONFIGS and source
        if "cenet" in rel:
            assert f"{top1:.1f} top-1" in _text(rel), rel
        else:
            assert f"{100 - top1:.2f}" in _text(rel) or f"{100 - top1:.1f}" in _text(rel), rel


# rows whose params/GFLOPs are re-measured here (every block once, three backbone families); `python -m tools.rows
# --check` re-measures all of them (minutes: one meta-device model per config)
MEASURED = ["cifar/cifar10/resnet20.yaml", "cifar/cifar10/ce_resnet20.yaml", "cifar/cifar10/se_resnet20.yaml",
            "cifar/cifar100/ed_resnet20.yaml", "cifar/cifar100/we_resnet20.yaml",
            "imagenet/shufflenet/ce_shufflenet_v2_x0_5.yaml", "imagenet/shufflenet/shufflenet_v2_x1_0.yaml",
            "imagenet/we/werepo_l_resnet18.yaml"]


def test_rows_table_is_in_sync():
    with open(rows.TABLE, encoding="utf-8") as f:
        table = f.read()
    assert table.startswith(rows.HEADER)
    lines = {re.search(r"\(\.\./configs/(.+?)\)", ln).group(1): ln for ln in table.splitlines() if "(../configs/" in ln}
    assert list(lines) == CONFIGS, "docs/rows.md is out of date: run python -m tools.rows"
    for rel, line in lines.items():
        cells = rows.row(rel)
        expected = rows.format_row(cells[:4] + tuple(line.split(" | ")[4:6]) + cells[6:])
        assert line == expected, f"docs/rows.md is out of date at {rel}: run python -m tools.rows"
    cache = {}
    for rel in MEASURED:
        assert lines[rel] == rows.format_row(rows.row(rel, cache)), f"{rel}: params/GFLOPs changed; run python -m tools.rows"
    assert "| 2.28 | 0.145 |" in lines["imagenet/shufflenet/shufflenet_v2_x1_0.yaml"]   # torchvision's 2,278,604 / 0.145


@pytest.mark.parametrize("block", ["ce", "se"])
def test_shufflenet_rows_train_through_train_sh(block, tmp_path):
    """2 processes, 2 data workers each, bf16 autocast and channels_last, on CPU with synthetic data."""
    r = run_train_sh(os.path.join(ROOT, "configs", "imagenet", "shufflenet", f"{block}_shufflenet_v2_x0_5.yaml"), 2,
                     "data.dataset=synthetic", "data.root=null", "data.input_size=64", "data.workers=2",
                     "data.synthetic.train_size=16", "data.synthetic.val_size=8", "model.num_classes=10",
                     "train.batch_size=8", "train.epochs=1", "train.amp=bf16", "train.channels_last=true",
                     "eval.batch_size=8", "runtime.device=cpu", "runtime.tensorboard=false", "runtime.log_interval=1",
                     f"runtime.work_dir={tmp_path / 'run'}", cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.out[-3000:]
    assert "world size 2 (gloo)" in r.out and "mixed precision: bf16 autocast on cpu" in r.out, r.out[-3000:]
    assert "val epoch 1" in r.out, r.out[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "epoch_001.pth", weights_only=True)
    assert state["step"] == 2 and any(f".{block}." in k for k in state["model"])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_torchvision_shufflenet_checkpoint_evaluates_with_test_sh(tmp_path):
    import subprocess

    import torchvision

    def test_sh(ckpt):
        r = subprocess.run([os.path.join(ROOT, "test.sh"), "configs/imagenet/shufflenet/shufflenet_v2_x0_5.yaml",
                            str(ckpt), "data.dataset=synthetic", "data.root=null", "data.input_size=64",
                            "data.workers=0", "data.synthetic.val_size=8", "eval.batch_size=8", "runtime.device=cpu"],
                           cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=300)
        return r.returncode, r.stdout + r.stderr

    torch.manual_seed(0)
    torch.save(torchvision.models.shufflenet_v2_x0_5().state_dict(), tmp_path / "x0_5.pth")
    rc, out = test_sh(tmp_path / "x0_5.pth")
    assert rc == 0 and re.search(r"x0_5\.pth: top1 [\d.]+ top5 [\d.]+ loss [\d.]+ \(8/8 images\)", out), out[-3000:]
    torch.save(torchvision.models.shufflenet_v2_x1_0().state_dict(), tmp_path / "x1_0.pth")   # another width
    rc, out = test_sh(tmp_path / "x1_0.pth")
    assert rc != 0 and "Traceback" not in out and "shape" in out, out[-3000:]
