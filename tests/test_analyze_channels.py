"""tools.analyze_channels / analysis.channel_stats: hook places on every backbone x block, dead channels, CLI."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from analysis.channel_stats import ChannelProbe
from blocks.we import WEConv2d
from models import build_model
from models.resnet import Bottleneck, ResidualBlock
from tools import analyze_channels

CE = {"type": "ce", "stages": [1, 2, 3]}
SE = {"type": "se", "reduction": 4}
WE = {"type": "we", "lwe": True, "mwe": True}

# backbone, ED options that fit its widths, input size
BACKBONES = [("resnet18", {"groups": 8}, 32), ("resnet50", {}, 32), ("resnext50_32x4d", {"reduction": 2}, 32),
             ("cifar_resnet20", {"groups": 4}, 16), ("mobilenet_v2", None, 32)]


def _expected_sites(model):
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    if blocks:   # stem ReLU + inner norm-ReLUs + block outputs
        return 1 + sum(3 if isinstance(b, Bottleneck) else 2 for b in blocks)
    from models.mobilenetv2 import ConvNormAct
    return sum(isinstance(m, ConvNormAct) for m in model.modules())


def _combos():
    for backbone, ed, size in BACKBONES:
        yield backbone, size, {"plugins": [CE]}
        yield backbone, size, {"plugins": [SE]}
        yield backbone, size, {"conv": WE}
        if ed is not None:
            yield backbone, size, {"plugins": [{"type": "ed", "position": "parallel", **ed}, SE]}


@pytest.mark.parametrize("backbone,size,blocks", list(_combos()),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_probe_finds_every_site_and_block(backbone, size, blocks):
    torch.manual_seed(0)
    model = build_model({"backbone": backbone, "num_classes": 5, **blocks}).eval()
    probe = ChannelProbe(model)
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
    probe.remove()
    assert len(probe.sites) == _expected_sites(model)
    assert all(s.count > 0 and s.total is not None for s in probe.sites), "a site's hook never fired"
    assert len({s.name for s in probe.sites}) == len(probe.sites)
    plugins = {n for n, m in model.named_modules() if getattr(m, "_blocklab_plugin", False)}
    convs = {n for n, m in model.named_modules() if isinstance(m, WEConv2d)}
    found = {b["name"]: b for b in probe.block_summaries()}
    assert set(found) == plugins | convs
    for name, b in found.items():
        numbers = _numbers(b)
        assert numbers and all(math.isfinite(v) for v in numbers), (name, b)
    if any(p.get("type") == "ed" for p in blocks.get("plugins", [])):
        assert all(b["path_to_branch_norm"] > 0 for b in found.values() if b["kind"] == "ed")
    if "ce" in {b["kind"] for b in found.values()}:
        assert all(b["sigmoid_theta"] == pytest.approx(0.5) for b in found.values() if b["kind"] == "ce")
    assert not any(m._forward_hooks for m in model.modules()), "hooks left behind"


def _numbers(obj):
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in _numbers(x)]
    return [float(obj)] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def test_dead_and_inhibited_channels_are_counted():
    torch.manual_seed(0)
    model = build_model({"backbone": "cifar_resnet20", "num_classes": 4}).eval()
    bn = model.layer1[0].bn1
    with torch.no_grad():
        bn.weight[:3] = 0.0
        bn.bias[:2] = -1.0          # channels 0, 1: relu(-1) = 0 everywhere: dead
        bn.bias[2] = 1e-6           # channel 2: constant 1e-6, alive but inhibited
    x = torch.randn(8, 3, 16, 16)
    seen = {}
    def record(_m, _i, out):   # an independent computation of the site's per-channel magnitude
        seen["mag"] = F.relu(out).mean((0, 2, 3))
    handle = bn.register_forward_hook(record)
    probe = ChannelProbe(model)
    with torch.no_grad():
        model(x)
    probe.remove()
    handle.remove()
    rows = {r["site"]: r for r in analyze_channels.layer_rows(probe, threshold=0.01)}
    row = rows["layer1.0.bn1"]
    mag = torch.tensor(row["per_channel"]["magnitude"], dtype=torch.float64)
    torch.testing.assert_close(mag, seen["mag"].double(), rtol=1e-6, atol=1e-9)
    assert row["dead"] == 2 and row["per_channel"]["zero_fraction"][:2] == [1.0, 1.0]
    assert mag[2].item() == pytest.approx(1e-6)
    expected = int((seen["mag"] / seen["mag"].mean() < 0.01).sum())
    assert row["inhibited"] == expected >= 3
    assert row["per_channel"]["gamma"][:3] == [0.0, 0.0, 0.0]
    assert rows["layer1.1.bn1"]["dead"] == 0


def _config(tmp_path, name, plugins, workers=0):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        "model: {backbone: cifar_resnet20, num_classes: 4, plugins: %s}\n"
        "data: {dataset: synthetic, input_size: 16, workers: %d, pin_memory: false,\n"
        "       synthetic: {train_size: 16, val_size: 24}}\n"
        "runtime: {device: cpu}\n" % (plugins, workers))
    return str(path)


def _checkpoint(tmp_path, config):
    from engine.config import load_config
    torch.manual_seed(1)
    model = build_model(load_config(config).model)
    path = tmp_path / (config.rsplit("/", 1)[1] + ".pth")
    torch.save(model.state_dict(), path)
    return str(path)


def test_cli_compares_two_models(tmp_path, capsys):
    # data workers, as the ImageNet configs load (the analysis uses the config's loader settings)
    plain = _config(tmp_path, "plain", "[]", workers=2)
    ce = _config(tmp_path, "ce", "[{type: ce, stages: [1, 2, 3]}]", workers=2)
    out = tmp_path / "out"
    args = [plain, _checkpoint(tmp_path, plain), ce, _checkpoint(tmp_path, ce),
            "--batches", "2", "--batch-size", "8", "--out", str(out)]
    assert analyze_channels.main(args) == 0
    report = json.loads((out / "channels.json").read_text())["reports"]
    assert set(report) == {"plain", "ce"}
    assert report["ce"]["images"] == 16 and len(report["ce"]["layers"]) == 1 + 9 * 2
    assert [s["stage"] for s in report["plain"]["stages"]] == [0, 1, 2, 3]
    md = (out / "channels.md").read_text()
    assert "## plain" in md and "## ce" in md and "sigmoid(theta)" in md
    import matplotlib.image
    for png in ("cdf_stages.png", "inhibited_depth.png"):
        h, w, _ = matplotlib.image.imread(out / png).shape
        assert h > 300 and w > 600


@pytest.mark.parametrize("case", ["other_arch", "missing"])
def test_bad_checkpoint_is_refused_before_writing(case, tmp_path, capsys):
    plain = _config(tmp_path, "plain", "[]")
    ce = _config(tmp_path, "ce", "[{type: ce}]")
    ckpt = _checkpoint(tmp_path, ce) if case == "other_arch" else str(tmp_path / "nope.pth")
    out = tmp_path / "out"
    assert analyze_channels.main([plain, ckpt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not out.exists()
