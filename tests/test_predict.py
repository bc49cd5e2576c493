"""Issue 19.6: checkpoints carry class names, exported files their preprocessing, and tools.predict agrees
with ./test.sh on the same images (eager and ONNX)."""
import contextlib
import io
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image

from tests.engine_helpers import ROOT, launch_env

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A CIFAR ResNet-20 trained one epoch on a tiny image folder: (config path, checkpoint, val images, labels)."""
    from engine.config import load_config
    from engine.trainer import Trainer
    tmp = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    val = []
    for split, n in (("train", 4), ("val", 3)):
        for label, name in enumerate(CLASSES):
            os.makedirs(tmp / "data" / split / name)
            for i in range(n):
                pixels = rng.integers(0, 256, (22, 27, 3)) // 2 + 40 * label  # odd sizes: resize + crop matter
                path = tmp / "data" / split / name / f"{i}.png"
                Image.fromarray(pixels.astype(np.uint8)).save(path)
                if split == "val":
                    val.append((str(path), label))
    cfg = tmp / "tiny.yaml"
    cfg.write_text(f"""
model: {{backbone: cifar_resnet20, num_classes: 3}}
data: {{dataset: imagenet_folder, root: {tmp / 'data'}, input_size: 16, eval_resize: 19, workers: 0}}
train: {{epochs: 1, batch_size: 4, lr: 0.05}}
eval: {{batch_size: 4}}
runtime: {{device: cpu, work_dir: {tmp / 'run'}, tensorboard: false}}
""")
    result = Trainer(load_config(str(cfg))).train()
    return str(cfg), result["checkpoint"], [p for p, _ in val], [label for _, label in val]


def predict(*argv):
    from tools import predict as tool
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = tool.main([str(a) for a in argv])
    return code, out.getvalue()


def top1(model, images):
    code, out = predict(model, *images, "--json", "--topk", 2)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in rows] == images and all(len(r["top"]) == 2 for r in rows)
    return [r["top"][0]["index"] for r in rows], [r["top"][0]["class"] for r in rows]


def test_checkpoints_store_the_class_names(trained):
    from engine.checkpoint import load_checkpoint
    assert load_checkpoint(trained[1])["classes"] == CLASSES


def test_predict_agrees_with_test_sh_eager_and_onnx(trained, tmp_path):
    from tools import deploy
    cfg, ckpt, images, labels = trained
    r = subprocess.run([os.path.join(ROOT, "test.sh"), cfg, ckpt, "1", "--out", str(tmp_path / "m.json")],
                       cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    metrics = json.load(open(tmp_path / "m.json"))
    assert metrics["count"] == len(images)

    eager, names = top1(ckpt, images)
    assert names == [CLASSES[i] for i in eager]
    accuracy = 100.0 * sum(p == y for p, y in zip(eager, labels)) / len(labels)
    assert accuracy == pytest.approx(metrics["top1"])

    onnx_path = tmp_path / "m.onnx"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert deploy.main([cfg, ckpt, "--format", "onnx", "--out", str(onnx_path), "--batch", "1"]) == 0
    assert "preprocessing (metadata_props): input 16x16 (shorter side 19, centre crop 16)" in out.getvalue()
    import onnx
    props = {p.key: json.loads(p.value) for p in onnx.load(str(onnx_path)).metadata_props}
    assert props["blocklab.input_size"] == 16 and props["blocklab.eval_resize"] == 19
    assert props["blocklab.mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert props["blocklab.std"] == pytest.approx([0.229, 0.224, 0.225])
    assert props["blocklab.classes"] == CLASSES and props["blocklab.layout"].startswith("NCHW float32, RGB")
    assert top1(onnx_path, images)[0] == eager

    code, text = predict(ckpt, images[0], "--topk", 3)
    assert code == 0 and text.startswith(f"{images[0]}: ") and all(c in text for c in CLASSES)


def test_torchscript_gets_a_sidecar_and_bad_input_one_line(trained, tmp_path, capsys):
    from tools import deploy
    cfg, ckpt, images, _ = trained
    path = tmp_path / "m.ts"
    assert deploy.main([cfg, ckpt, "--format", "torchscript", "--out", str(path)]) == 0
    assert json.load(open(str(path) + ".json"))["blocklab.classes"] == json.dumps(CLASSES)
    assert top1(path, images[:2])[0] == top1(ckpt, images[:2])[0]
    capsys.readouterr()
    assert predict(ckpt, tmp_path / "nothing.png")[0] == 2
    assert "nothing.png does not exist" in capsys.readouterr().err
    (tmp_path / "bad.png").write_text("not an image")
    assert predict(ckpt, tmp_path / "bad.png")[0] == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and len(err.strip().splitlines()) == 1
