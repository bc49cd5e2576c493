"""tools.ablation end to end on tiny synthetic data (two variants, two seeds), and its noise test."""
import csv
import json
import statistics

import pytest

from tools import ablation

TINY = ["data.dataset=synthetic", "data.synthetic.train_size=32", "data.synthetic.val_size=16", "data.input_size=16",
        "train.epochs=2", "train.batch_size=8", "eval.batch_size=8", "runtime.log_interval=2"]


def test_ablation_trains_compares_and_analyses(tmp_path):
    out, root = tmp_path / "out", tmp_path / "runs"
    assert ablation.main(["--variants", "resnet20", "ce_resnet20", "--seeds", "0", "1", "--batches", "1",
                          "--work-root", str(root), "--out", str(out), *TINY]) == 0
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == ["ce_resnet20_s0", "ce_resnet20_s1", "resnet20_s0", "resnet20_s1"]
    best = {}
    for name in ("resnet20_s0", "resnet20_s1"):   # independently of tools.compare: straight from metrics.jsonl
        records = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        best[name] = max(r["top1"] for r in records if r["kind"] == "val")
    text = (out / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| resnet20 |"))
    assert f"{statistics.mean(best.values()):.2f} ± {statistics.stdev(best.values()):.2f}" in row
    assert "| ce_resnet20 |" in text and "python -m tools.ablation --variants" in text
    assert "measured on 16 validation images (one image = 6.25 points)" in text
    import matplotlib.image
    for png in ("top1.png", "curves.png", "cdf_stages.png", "inhibited_depth.png"):
        assert matplotlib.image.imread(out / png).shape[0] > 300
    seeds = json.loads((root / "channels" / "channels.json").read_text())["models"]
    assert list(seeds) == ["resnet20", "ce_resnet20"] and "resnet20_s0" in seeds["resnet20"][0]


def _rows(variant, values):
    return [{"variant": variant, "best_top1": v, "final_top1": v, "params_m": 1.0, "gflops": 1.0,
             "train_img_s": 10.0} for v in values]


@pytest.mark.parametrize("base,other,images,beyond", [
    ([50.0, 51.0, 49.5], [60.0, 61.0, 59.5], 10000, True),
    ([50.0, 51.0, 49.5], [50.5, 51.5, 49.0], 10000, False),
    # equal seeds have no spread, but 360 images cannot tell 99.44 from 99.26 (less than one image)
    ([99.44, 99.44, 99.44], [99.17, 99.44, 99.17], 360, False),
    ([99.44, 99.44, 99.44], [90.0, 90.28, 89.72], 360, True)])
def test_noise_verdict(base, other, images, beyond):
    agg = ablation.aggregate(_rows("plain", base) + _rows("x", other), ["plain", "x"], images)
    assert agg[1]["diff"] == pytest.approx(statistics.mean(other) - statistics.mean(base), abs=1e-9)
    p, q = statistics.mean(base) / 100, statistics.mean(other) / 100
    se = (statistics.variance(base) / 3 + statistics.variance(other) / 3 + 1e4 * (p * (1 - p) + q * (1 - q)) / images)
    assert agg[1]["se"] == pytest.approx(se ** 0.5)
    table = ablation.markdown(agg, "cmd", 60.0, [0, 1, 2], images, 120.0)
    line = next(line for line in table.splitlines() if line.startswith("| x |"))
    assert ("| yes |" in line) == beyond


def test_unknown_variant_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        ablation.parse_args(["--variants", "resnet2O"])
    assert e.value.code == 2 and "resnet2O" in capsys.readouterr().err
