"""benchmarks.benchmark on CPU: end to end on a tiny model, channels_last parity of every block model, --check."""
import json

import pytest
import torch

import blocks
from models import build_model
from benchmarks import benchmark, checks, harness

TINY = benchmark.SUITES["tiny"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box is small and shared: one thread is faster and steadier
    yield
    torch.set_num_threads(threads)


def test_runs_end_to_end_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    r20 = {"name": "r20", "backbone": "cifar_resnet20", "num_classes": 10}
    we20 = dict(r20, name="we20", conv={"type": "we"})
    rc = benchmark.main(["--model-json", json.dumps(r20), "--model-json", json.dumps(we20), "--fold-we",
                         "--input-size", "16", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                         "--repeats", "1", "--mode", "both", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["device"]["type"] == "cpu" and report["versions"]["torch"] == torch.__version__
    assert report["settings"]["precision"] == "fp32" and report["settings"]["batch_size"] == 2
    rows = {(r["model"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {("r20", "train"), ("r20", "infer"), ("we20", "train"), ("we20", "infer"),
                         ("we20+fold", "infer")}
    for (name, mode), r in rows.items():
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["n_steps"] == 2
        assert r["mfu"] is None and r["peak_mem_mb"] is None  # CPU: no datasheet peak, no device memory
        if mode == "infer":
            assert r["step_gflops"] == pytest.approx(2 * r["gmacs"] * 2)
        assert r["tflops"] == pytest.approx(r["step_gflops"] / r["step_ms"])  # GFLOP / ms = TFLOP/s
        assert r["baseline"] == "r20"
    assert rows[("r20", "train")]["ratio"] == 1.0
    assert rows[("r20", "train")]["params_m"] == pytest.approx(0.27, abs=0.01)


@pytest.mark.parametrize("name", ["we_cifar_resnet20", "ce_cifar_resnet20"])
def test_train_flops_count_what_a_training_step_runs(name):
    # MFU used 3 x the eval forward of the WE-folded model: no WE excitation, no CE statistics
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = build_model(TINY[name])
    counted = harness.train_step_flops(model, 16, 3)
    x = torch.randn(3, 3, 16, 16)
    with FlopCounterMode(display=False) as direct:
        torch.nn.functional.cross_entropy(model.train()(x), torch.zeros(3, dtype=torch.long)).backward()
    assert counted == pytest.approx(direct.get_total_flops(), rel=1e-9)  # batches 2, 4 extended to 3


def test_peak_table_matches_datasheets():
    assert harness.peak_for_name("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert harness.peak_for_name("NVIDIA H200", "bf16") == 989e12
    assert harness.peak_for_name("NVIDIA H100 PCIe", "bf16") == 756e12
    assert harness.peak_for_name("NVIDIA A100-SXM4-80GB", "tf32") == 156e12
    assert harness.peak_for_name("Some GPU", "bf16") is None


def test_tiny_suite_covers_every_registered_block():
    used = {p["type"] for spec in TINY.values() for p in spec.get("plugins", [])}
    used |= {spec.get("conv", {}).get("type", "plain") for spec in TINY.values()}
    assert set(blocks.BLOCKS) | set(blocks.CONVS) <= used


@pytest.mark.parametrize("name", list(TINY))
def test_channels_last_equals_contiguous(name):
    torch.manual_seed(0)
    model = build_model(TINY[name]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def test_check_mode_passes_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    rc = benchmark.main(["--suite", "tiny", "--check", "--input-size", "32", "--batch-size", "4",
                         "--check-steps", "2", "--device", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())["check"]
    assert rc == 0, [r for r in rows if not r["ok"]]
    checks = {(r["model"], r["check"]) for r in rows}
    for name in list(blocks.BLOCKS):
        assert (f"block:{name}", "bf16 vs fp32 (train)") in checks
    assert ("we_cifar_resnet20", "WE folded vs unfolded") in checks
    assert all(r["ok"] for r in rows)


def test_config_file_gives_model_and_input_size(tmp_path):
    cfg = tmp_path / "se_r20.yaml"
    cfg.write_text("model:\n  backbone: cifar_resnet20\n  num_classes: 10\n  plugins:\n    - {type: se}\n"
                   "data:\n  input_size: 16\n")
    out = tmp_path / "r.json"
    rc = benchmark.main(["--config", str(cfg), "--mode", "infer", "--batch-size", "2", "--steps", "1",
                         "--warmup", "1", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "se_r20" and row["input_size"] == 16 and row["mode"] == "infer"


def test_bench_blocks_tables_at_a_tiny_size(tmp_path):
    from benchmarks import bench_blocks
    out = tmp_path / "blocks.md"
    assert bench_blocks.main(["--input-size", "32", "--batch", "2", "--rounds", "1", "--threads", "1",
                              "--sections", "bc", "--models", "ce_resnet50,we_resnet50", "--out", str(out)]) == 0
    text = out.read_text()
    for row in ("| resnet50 |", "| ce_resnet50 |", "| we_resnet50 |", "| we_resnet50 folded |"):
        assert row in text
    assert "batch 2 at 32x32" in text and "(a)" not in text
    assert "max relative difference 0.0e+00" in text  # folding changes nothing the model computes


def test_bench_blocks_refuses_an_unknown_model():
    from benchmarks import bench_blocks
    with pytest.raises(SystemExit) as exc:
        bench_blocks.main(["--sections", "b", "--models", "ce_resnet5O"])
    assert exc.value.code == 2


class _Breaks(torch.nn.Module):
    """A forward with one graph break (a tensor value read into Python) in our own file."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum().item() > 0:  # the break: dynamo cannot trace .item() by default
            y = y * 2
        return y.flatten(1)


def test_graph_breaks_are_counted_and_explained():
    # torch._dynamo.explain can record a break reason while its graph_break_count stays 0: the row
    # said "0 breaks, ok" for a model that breaks, and named no reason
    import argparse
    entry = benchmark.Entry("breaks", {"backbone": "cifar_resnet20"}, input_size=4)
    entry.model = _Breaks()
    args = argparse.Namespace(channels_last=False, batch_size=1, precision="fp32")
    rows = checks.graph_breaks([entry], args, torch.device("cpu"))
    assert [r["mode"] for r in rows] == ["train", "eval"]
    for r in rows:
        assert not r["ok"] and r["breaks"] >= 1, r
        assert any("item()" in reason and "test_benchmark_tool.py:" in reason for reason in r["reasons"]), r
    assert "item()" in checks.breaks_table(rows)
