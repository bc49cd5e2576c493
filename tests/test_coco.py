"""COCO-format data (data/coco.py, data/shapes.py) and COCO evaluation (engine/coco_eval.py)."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from data.coco import CocoDetection, GroupedBatchSampler
from data.errors import DataError
from data.loader import ShardSampler, build_loader
from data.shapes import make_shapes_coco
from engine.coco_eval import evaluate_coco, summarize

TRAIN_ANN, VAL_ANN = "annotations/instances_train2017.json", "annotations/instances_val2017.json"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return str(make_shapes_coco(str(tmp_path_factory.mktemp("shapes")), {"train2017": 24, "val2017": 7}, 64))


def _set(root, split="val2017", ann=VAL_ANN, train=False, **kw):
    return CocoDetection(os.path.join(root, split), os.path.join(root, ann), train, **kw)


# ------------------------------------------------------------------------------------------------ the data

def test_the_generated_set_is_coco_format_with_gapped_ids_and_masks(shapes):
    ds = _set(shapes, masks=True)
    assert ds.cat_ids == [1, 3, 7] and ds.classes == ["circle", "square", "triangle"] and len(ds) == 7
    for i in range(len(ds)):
        image, t = ds[i]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert t["masks"].shape[1:] == image.shape[1:] and len(t["masks"]) == len(t["boxes"])
        for box, mask in zip(t["boxes"], t["masks"]):  # each box bounds its mask (to a pixel)
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1
        assert set(t["labels"].tolist()) <= {1, 2, 3}
    assert make_shapes_coco(shapes + "_again", {"val2017": 7}, 64) and \
        open(os.path.join(shapes, VAL_ANN)).read() == open(os.path.join(shapes + "_again", VAL_ANN)).read()


def test_training_drops_images_without_objects_and_evaluation_keeps_them(shapes):
    doc = json.load(open(os.path.join(shapes, TRAIN_ANN)))
    empty = {im["id"] for im in doc["images"]} - {a["image_id"] for a in doc["annotations"]}
    assert empty, "the generator should make some images without objects"
    train = _set(shapes, "train2017", TRAIN_ANN, train=True)
    assert train.num_dropped == len(empty) and not set(train.ids) & empty
    assert len(_set(shapes, "train2017", TRAIN_ANN)) == len(doc["images"])


def test_flip_is_drawn_from_the_sample_seed(shapes):
    ds = _set(shapes, "train2017", TRAIN_ANN, train=True, masks=True, hflip=0.5)
    plain, t = ds[0]
    flips = [ds[(0, seed)] for seed in range(8)]
    flipped = [f for f in flips if not torch.equal(f[0], plain)]
    assert 0 < len(flipped) < 8 and all(torch.equal(f[0], plain.flip(-1)) for f in flipped)
    w = plain.shape[-1]
    fb = flipped[0][1]["boxes"]
    assert torch.allclose(fb[:, 0], w - t["boxes"][:, 2]) and torch.equal(flipped[0][1]["masks"], t["masks"].flip(-1))
    assert torch.equal(ds[(0, 3)][0], ds[(0, 3)][0])


def test_batches_group_by_orientation_with_a_fixed_count_and_skip():
    ratios = [1.5, 0.7, 1.2, 0.6, 0.8, 1.4, 1.1, 0.5, 1.3, 0.9, 1.6]
    groups = [int(r >= 1) for r in ratios]
    keys = [(i, 100 + i) for i in range(len(ratios))]
    bs = GroupedBatchSampler(keys, groups, 3)
    batches = list(bs)
    assert len(batches) == len(bs) == 3
    assert all(len({groups[k[0]] for k in b}) == 1 for b in batches[:2])
    bs.set_skip(2)
    assert list(bs) == batches[2:] and list(bs) == batches  # a skip holds for one epoch only


def test_the_loader_groups_training_batches_and_shards_evaluation(shapes):
    cfg = {"dataset": "coco", "root": shapes, "workers": 0}
    train = _set(shapes, "train2017", TRAIN_ANN, train=True)
    loader = build_loader(train, cfg, "train", 4)
    assert len(loader) == len(train) // 4
    images, targets = next(iter(loader))
    assert len(images) == 4 and all("boxes" in t for t in targets)
    assert len({im.shape[-1] >= im.shape[-2] for im in images}) == 1
    assert images.to("cpu")[0].dtype == torch.uint8  # a Batch moves like a tensor


def _refusal(tmp_path, shapes, edit, match):
    doc = json.load(open(os.path.join(shapes, VAL_ANN)))
    edit(doc)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=match) as e:
        CocoDetection(os.path.join(shapes, "val2017"), str(path), False)
    assert "\n" not in str(e.value)


def test_refusals_name_the_problem_in_one_line(tmp_path, shapes):
    with pytest.raises(DataError, match="not found; set data.root"):
        CocoDetection(shapes, str(tmp_path / "missing.json"), False)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json is not valid JSON"):
        CocoDetection(shapes, str(tmp_path / "bad.json"), False)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="not COCO instances format"):
        CocoDetection(shapes, str(tmp_path / "list.json"), False)

    def out_of_bounds(doc):
        doc["annotations"][0]["bbox"][0] = 500

    def unknown_category(doc):
        doc["annotations"][1]["category_id"] = 2

    _refusal(tmp_path, shapes, out_of_bounds, r"annotation \d+ \(image \d+\): bbox .* lies outside its")
    _refusal(tmp_path, shapes, unknown_category, r"has category_id 2, not one of the file's categories \[1, 3, 7\]")


def test_a_corrupt_image_is_named(tmp_path, shapes):
    import shutil
    root = tmp_path / "set"
    shutil.copytree(shapes, root)
    name = json.load(open(root / VAL_ANN))["images"][2]["file_name"]
    (root / "val2017" / name).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ds = _set(str(root))
    with pytest.raises(DataError, match=f"image .*{name} cannot be read") as e:
        ds[2]
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- COCO evaluation

def _hand_made(tmp_path):
    """Two 200x200 images, one 100x100 box each (category 5)."""
    doc = {"images": [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in (1, 2)],
           "annotations": [{"id": i, "image_id": i, "category_id": 5, "bbox": [10, 20, 100, 100], "area": 10000,
                            "iscrowd": 0, "segmentation": [[10, 20, 110, 20, 110, 120, 10, 120]]} for i in (1, 2)],
           "categories": [{"id": 5, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    return CocoDetection(str(tmp_path), str(tmp_path / "ann.json"), False)


def test_perfect_detections_score_one(tmp_path):
    ds = _hand_made(tmp_path)
    results = [{"image_id": i, "category_id": 5, "bbox": [10, 20, 100, 100], "score": 0.9} for i in (1, 2)]
    m, table = summarize(ds.coco, results, ("bbox",), [1, 2])
    assert m["bbox_AP"] == m["bbox_AP50"] == m["bbox_AP75"] == m["bbox_APl"] == 1.0
    assert m["bbox_APs"] == m["bbox_APm"] == 0.0  # no ground truth of those sizes (COCOeval's -1)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in table


def test_shifted_boxes_score_the_computed_ap(tmp_path):
    # shifted 20 px right: IoU = 80*100 / (120*100) = 2/3, a hit at IoU thresholds 0.50..0.65 (4 of 10)
    ds = _hand_made(tmp_path)
    results = [{"image_id": i, "category_id": 5, "bbox": [30, 20, 100, 100], "score": 0.9} for i in (1, 2)]
    m, _ = summarize(ds.coco, results, ("bbox",), [1, 2])
    assert m["bbox_AP"] == pytest.approx(0.4) and m["bbox_AP50"] == 1.0 and m["bbox_AP75"] == 0.0
    assert summarize(ds.coco, [], ("bbox",), [1, 2])[0]["bbox_AP"] == 0.0


class Oracle(torch.nn.Module):
    """Answers each image with its ground truth (looked up by the image's content), score 1."""

    def __init__(self, dataset):
        super().__init__()
        self.truth = {dataset[i][0].float().sum().item(): dataset[i][1] for i in range(len(dataset))}

    def forward(self, images):
        out = []
        for im in images:
            t = self.truth[(im * 255).round().sum().item()]
            out.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))})
        return out


def _evaluate_shard(rank, world, port, root, queue):
    import torch.distributed as dist
    from engine.tasks import ToFloat
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ds = _set(root)
    loader = build_loader(ds, {"dataset": "coco", "root": root, "workers": 0}, "val", 2, distributed=True)
    assert isinstance(loader.sampler, ShardSampler)
    m = evaluate_coco(Oracle(ds), loader, torch.device("cpu"), ToFloat(), "none")
    queue.put((rank, m["count"], m["bbox_AP"]))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_distributed_evaluation_counts_every_image_once(shapes, world):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_evaluate_shard, args=(r, world, port, shapes, queue)) for r in range(world)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert got == [(r, 7, 1.0) for r in range(world)]  # 7 images with 3 ranks: shards of 3, 2, 2


# ------------------------------------------------------------------------------------ the engine's detection task

def _detector_cfg(work_dir, root, *overrides):
    from engine.config import load_config
    return load_config(os.path.join(ROOT, "configs/detection/shapes_demo.yaml"), [
        f"data.root={root}", f"runtime.work_dir={work_dir}", "data.workers=0", "train.batch_size=4",
        "train.epochs=2", "train.warmup_epochs=0", "train.milestones=[1]", "eval.interval=0", "eval.final=false",
        "detector.min_size=48", "detector.max_size=64", "detector.fpn_channels=16",
        "detector.box_batch_size_per_image=32", "detector.rpn_post_nms_top_n=64", "runtime.keep_last=1",
        "runtime.log_interval=1", *overrides])


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_detector_resumes_exactly_after_sigterm(tmp_path, shapes, monkeypatch):
    import signal
    from engine.trainer import Trainer
    from tests.engine_helpers import assert_same, weights
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ref = Trainer(_detector_cfg(tmp_path / "a", shapes))
    assert ref.train()["status"] == "done" and ref.iters_per_epoch >= 3

    first = Trainer(_detector_cfg(tmp_path / "b", shapes))
    step = first.optimizer_step

    def stop_in_epoch_2():  # during the first step of epoch 2: the run stops after it
        step()
        if first.step == first.iters_per_epoch:
            os.kill(os.getpid(), signal.SIGTERM)
    first.optimizer_step = stop_in_epoch_2
    assert first.train()["status"] == "preempted" and first.iter_in_epoch == 1
    second = Trainer(_detector_cfg(tmp_path / "b", shapes))
    assert (second.epoch, second.iter_in_epoch) == (1, 1)
    assert second.train()["status"] == "done" and second.step == ref.step
    assert_same(weights(second.model), weights(ref.model))
    log = (tmp_path / "b" / "log.txt").read_text()
    assert "loss_box_reg" not in log and " box_reg " in log and " objectness " in log  # loss components


@pytest.mark.parametrize("override, message", [
    ("data.dataset=digits", "task: detection reads COCO-format data; set data.dataset=coco"),
    ("eval.best_metric=top1", "eval.best_metric=top1 is not a detection metric"),
    ("eval.best_metric=segm_AP", "needs masks: set detector.type=mask_rcnn"),
    ("detector.anchor_sizes=[32,64]", "detector.anchor_sizes has 2 sizes but the FPN has 4 levels"),
    ("detector.typo=1", "unknown key 'detector.typo'"),
    ("detector.num_classes=5", "has 3 categories but detector.num_classes=5; set detector.num_classes=3"),
])
def test_detection_configs_are_refused_in_one_line_writing_nothing(tmp_path, shapes, override, message):
    from core.fields import ConfigError
    from engine.trainer import Trainer
    with pytest.raises(ConfigError, match=message) as e:
        Trainer(_detector_cfg(tmp_path / "run", shapes, override))
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_the_documented_generator_command_writes_the_standard_layout(tmp_path, capsys):
    from tools.make_shapes_coco import main
    main([str(tmp_path / "set"), "--train", "3", "--val", "2", "--size", "32"])
    assert "wrote 3 + 2 images" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "set" / "train2017")) == 3 and len(os.listdir(tmp_path / "set" / "val2017")) == 2
    assert len(_set(str(tmp_path / "set"))) == 2


def test_train_sh_two_processes_with_workers_then_test_sh_reproduces_the_ap(tmp_path, shapes):
    import subprocess
    from tests.engine_helpers import launch_env, run_train_sh
    work = tmp_path / "run"
    over = [f"data.root={shapes}", f"runtime.work_dir={work}", "data.workers=1", "train.batch_size=4",
            "train.epochs=1", "train.warmup_epochs=0", "detector.min_size=48", "detector.max_size=64",
            "detector.fpn_channels=16", "detector.box_batch_size_per_image=32", "detector.rpn_post_nms_top_n=64"]
    r = run_train_sh(os.path.join(ROOT, "configs/detection/shapes_demo.yaml"), 2, *over, cwd=tmp_path)
    assert r.returncode == 0, r.out[-3000:]
    assert "world size 2 (gloo" in r.out and "Average Precision  (AP) @[ IoU=0.50:0.95" in r.out
    val = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()
           if '"val"' in line][-1]
    assert val["count"] == 7
    t = subprocess.run([os.path.join(ROOT, "test.sh"), os.path.join(ROOT, "configs/detection/shapes_demo.yaml"),
                        str(work / "checkpoints" / "best.pth"), "2", *over], cwd=tmp_path, env=launch_env(),
                       capture_output=True, text=True, timeout=300)
    assert t.returncode == 0, (t.stdout + t.stderr)[-3000:]
    test = json.loads((work / "test_best.json").read_text())
    assert test["count"] == 7  # metrics.jsonl rounds to 6 digits
    assert test["bbox_AP"] == pytest.approx(val["bbox_AP"], abs=1e-6) and \
        test["bbox_AP50"] == pytest.approx(val["bbox_AP50"], abs=1e-6)
    assert isinstance(json.loads((work / "detections_best.json").read_text()), list)


def test_mask_results_are_evaluated_as_segm(shapes):
    from engine.tasks import ToFloat

    class MaskOracle(Oracle):
        def forward(self, images):
            out = super().forward(images)
            for o, im in zip(out, images):
                o["masks"] = self.masks[(im * 255).round().sum().item()][:, None].float()
            return out
    ds = _set(shapes, masks=True)
    model = MaskOracle(ds)
    model.masks = {ds[i][0].float().sum().item(): ds[i][1]["masks"] for i in range(len(ds))}
    loader = build_loader(ds, {"dataset": "coco", "root": shapes, "workers": 0}, "val", 3)
    m = evaluate_coco(model, loader, torch.device("cpu"), ToFloat(), "none", ("bbox", "segm"))
    assert m["count"] == 7 and m["bbox_AP"] == 1.0 and m["segm_AP"] == pytest.approx(1.0, abs=0.02)
    assert "segm:" in m["table"]
