"""benchmarks/bench_detection.py end to end at tiny settings: both parts run and the report has every row."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_detection_tiny(tmp_path, monkeypatch):
    from benchmarks import bench_detection
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "det.md"
    res = bench_detection.main(["--steps", "1", "--rounds", "2", "--images", "8", "--size", "48", "--workers", "1",
                                "--loader-repeats", "1", "--out", str(out), "detector.min_size=32",
                                "detector.max_size=48", "detector.fpn_channels=8",
                                "detector.box_batch_size_per_image=16", "detector.rpn_post_nms_top_n=32"])
    text = out.read_text()
    for row in ("| CPU | torchvision reference", "| CPU | blocklab engine (`Trainer._train_epoch`), as configured",
                "| CPU | blocklab engine, `clip_grad_norm` off", "| wall | torchvision reference", "| 1 |"):
        assert row in text, row
    assert "Command: `python -m benchmarks.bench_detection --steps 1" in text
    assert set(res["cpu_ratio"]) == {"reference", "engine", "engine, no clipping"}
    assert res["cpu_ratio"]["reference"] == 1.0 and res["model_img_s"] > 0 and list(res["loader"]) == [1]
