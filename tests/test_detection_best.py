"""best.pth / best.json of a detection run: chosen by bbox AP (higher is better), the metric's name recorded."""
import json
import os

import pytest

from data.shapes import make_shapes_coco
from engine.checkpoint import load_checkpoint
from engine.checkpoint_manager import CheckpointManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return str(make_shapes_coco(str(tmp_path_factory.mktemp("shapes")), {"train2017": 8, "val2017": 3}, 48))


def _cfg(work_dir, root, *overrides):
    from engine.config import load_config
    return load_config(os.path.join(ROOT, "configs/detection/shapes_demo.yaml"), [
        f"data.root={root}", f"runtime.work_dir={work_dir}", "data.workers=0", "train.batch_size=4",
        "train.epochs=3", "train.warmup_epochs=0", "train.milestones=[2]", "eval.interval=1",
        "detector.min_size=32", "detector.max_size=48", "detector.fpn_channels=8",
        "detector.box_batch_size_per_image=16", "detector.rpn_post_nms_top_n=32", "runtime.keep_last=1",
        "runtime.log_interval=1", *overrides])


def test_a_detection_run_keeps_best_pth_by_bbox_ap(tmp_path, shapes, monkeypatch):
    from engine.trainer import Trainer
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    t = Trainer(_cfg(tmp_path / "run", shapes))
    real = t.task.evaluate
    scripted = iter([0.2, 0.5, 0.4])  # epoch 2 is the best by bbox AP; the real COCOeval runs underneath

    def evaluate(*args, **kwargs):
        m = real(*args, **kwargs)
        assert {"bbox_AP", "bbox_AP50", "bbox_AP75", "count"} <= set(m)
        return {**m, "bbox_AP": next(scripted)}
    t.task.evaluate = evaluate
    res = t.train()
    assert res["status"] == "done" and res["best_metric"] == 0.5
    ckpt = tmp_path / "run" / "checkpoints"
    best = json.loads((ckpt / "best.json").read_text())
    assert best["metric_name"] == "bbox_AP" and best["metric"] == 0.5 and best["mode"] == "max"
    assert best["file"] == "epoch_002.pth" and best["best_bbox_AP"] == 0.5
    assert "best_bbox_AP50" in best and "best_top1" not in best
    state = load_checkpoint(ckpt / "best.pth")
    assert state["epoch"] == 2 and state["metric"] == 0.5
    assert not (ckpt / "epoch_002.pth").exists()  # keep_last=1: best.pth is a copy of its own
    vals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert [v["bbox_AP"] for v in vals] == [0.2, 0.5, 0.4]


def test_best_json_names_its_metric_when_given(tmp_path):
    m = CheckpointManager(tmp_path, metric_name="top1")
    for epoch, top1 in enumerate([50.0, 70.0, 60.0], 1):
        m.save({"epoch": epoch}, f"epoch_{epoch}", metric=top1)
    best = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert best == {"file": "epoch_002.pth", "metric": 70.0, "metric_name": "top1", "mode": "max"}
