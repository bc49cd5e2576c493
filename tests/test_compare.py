"""tools.compare on runs the trainer really wrote: finished, unfinished and resumed runs; refusals."""
import csv
import os

import pytest

from analysis import runs as run_reader
from engine.trainer import Trainer
from models import build_model
from tests.engine_helpers import run_train_sh, tiny_cfg
from tools import compare

CE = "model.plugins=[{type: ce, position: after_norm, stages: [1, 2, 3]}]"


def _train(work_dir, *overrides):
    return Trainer(tiny_cfg(work_dir, "model.backbone=cifar_resnet20", *overrides)).train()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    _train(root / "plain")
    _train(root / "ce", CE)
    _train(root / "ce_resumed", CE, "runtime.max_steps=6")   # stops in epoch 2 after logging step 6 ...
    _train(root / "ce_resumed", CE)                            # ... resumes from epoch 1's checkpoint
    _train(root / "ce_unfinished", CE, "runtime.max_steps=6")
    return root


def test_resumed_run_reads_like_the_uninterrupted_one(runs):
    whole, resumed = run_reader.read_run(str(runs / "ce")), run_reader.read_run(str(runs / "ce_resumed"))
    lines = (runs / "ce_resumed" / "metrics.jsonl").read_text().splitlines()
    assert sum('"step": 6' in line and '"train"' in line for line in lines) == 2   # step 6 was logged twice
    assert [r["step"] for r in resumed.train] == [r["step"] for r in whole.train]
    assert [r["loss"] for r in resumed.train] == [r["loss"] for r in whole.train]   # exact resume, later record wins
    a, b = run_reader.summarize(whole, "a"), run_reader.summarize(resumed, "b")
    for key in ("best_top1", "best_top5", "final_top1", "epochs", "gflops", "params_m"):
        assert a[key] == b[key], key


def test_rows(runs):
    plain = run_reader.summarize(run_reader.read_run(str(runs / "plain")), "plain")
    ce = run_reader.summarize(run_reader.read_run(str(runs / "ce")), "ce")
    unfinished = run_reader.summarize(run_reader.read_run(str(runs / "ce_unfinished")), "u")
    cfg = tiny_cfg(runs / "x", "model.backbone=cifar_resnet20", CE).model
    assert ce["params_m"] == pytest.approx(sum(p.numel() for p in build_model(cfg).parameters()) / 1e6)
    assert ce["gflops"] > plain["gflops"] > 0   # CE's Gram/Newton/mixing work is counted
    assert (plain["blocks"], ce["blocks"]) == ("none", "ce")
    assert (ce["epochs"], ce["planned_epochs"], unfinished["epochs"]) == (2, 2, 1.5)
    val = [r for r in run_reader.read_run(str(runs / "ce")).val]
    assert ce["best_top1"] == max(r["top1"] for r in val) and ce["final_top1"] == val[-1]["top1"]
    assert ce["top5_err"] == pytest.approx(100 - max(r["top5"] for r in val))
    assert ce["train_img_s"] > 0 and ce["train_time_s"] > 0


def test_cli_writes_table_csv_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    dirs = [str(runs / n) for n in ("plain", "ce", "ce_unfinished")]
    assert compare.main(dirs + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| cifar_resnet20 |") == 3 and "| 1.5/2 |" in printed
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["plain", "ce", "ce_unfinished"]
    import matplotlib.image
    for png in ("curves.png", "tradeoffs.png"):
        h, w, _ = matplotlib.image.imread(out / png).shape
        assert h > 300 and w > 600


def test_same_names_get_paths(tmp_path):
    assert run_reader.run_names(["a/x", "b/x", "c/y"]) == ["a/x", "b/x", "y"]


def test_describe_blocks():
    assert run_reader.describe_blocks({"conv": {"type": "we", "lwe": True, "mwe": False},
                                    "plugins": [{"type": "ed"}, {"type": "se"}]}) == "we(lwe)+ed+se"


@pytest.mark.parametrize("case", ["missing", "empty", "no_val"])
def test_refusals_write_nothing(case, tmp_path, capsys):
    run = tmp_path / "run"
    if case == "empty":
        run.mkdir()
    if case == "no_val":
        _train(run, "runtime.max_steps=2")   # stops before the first evaluation
    out = tmp_path / "out"
    assert compare.main([str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(run) in err[0]
    assert {"missing": "no such directory", "empty": "not a training run",
            "no_val": "no validation metrics"}[case] in err[0]
    assert not out.exists()


def test_truncated_line_is_reported(runs, tmp_path, capsys):
    import shutil
    run = tmp_path / "cut"
    shutil.copytree(runs / "plain", run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')
    assert compare.main([str(run), "--out", str(tmp_path / "o"), "--no-flops"]) == 0
    assert "skipped 1 unreadable line" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "o" / "curves.png")


def test_reads_a_two_process_run_started_with_train_sh(tmp_path):
    """What users run: ./train.sh with 2 processes and data workers (rank 0 writes the files compare reads)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{backbone: cifar_resnet20, num_classes: 4}}
data: {{dataset: synthetic, input_size: 8, workers: 2, synthetic: {{train_size: 32, val_size: 9}}}}
train: {{epochs: 2, batch_size: 8, lr: 0.05}}
runtime: {{device: cpu, work_dir: {tmp_path / 'run'}, log_interval: 1, tensorboard: false}}
""")
    p = run_train_sh(cfg, 2, cwd=tmp_path)
    assert p.returncode == 0, p.out
    row = run_reader.summarize(run_reader.read_run(str(tmp_path / "run")), "run", flops=False)
    assert (row["epochs"], row["planned_epochs"]) == (2, 2)
    assert compare.main([str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--no-flops"]) == 0
    assert "| 2/2 |" in (tmp_path / "out" / "runs.md").read_text()
