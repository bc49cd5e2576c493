"""Weight Excitation: WEConv2d against an independent float64 reference, folding, autocast, converter."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from blocks.registry import get_conv
from blocks.we import WEConv2d, fold_we
from models import build_model
from models.converters import werepo

FLAGS = {
    "lwe": dict(lwe=True, mwe=False, ws=False),
    "mwe": dict(lwe=False, mwe=True, ws=False),
    "ws": dict(lwe=False, mwe=False, ws=True),
    "lwe+mwe": dict(lwe=True, mwe=True, ws=False),
    "ws+lwe+mwe": dict(lwe=True, mwe=True, ws=True),
}
# (in, out, kernel, stride, padding, groups)
SHAPES = {
    "dense3x3": (16, 8, 3, 1, 1, 1),
    "pointwise": (32, 16, 1, 2, 0, 1),
    "stem7x7": (3, 8, 7, 2, 3, 1),
    "grouped": (32, 32, 3, 1, 1, 4),
    "depthwise": (16, 16, 3, 2, 1, 16),
}


def ref_excite(w, fc=None, lwe=True, mwe=True, ws=False, eps=1e-5, margin=0.1):
    """The WE weight transform written out from the paper / original code, step by step."""
    out_ch = w.shape[0]
    if ws:
        flat = w.reshape(out_ch, -1)
        n = flat.shape[1]
        centred = flat - flat.sum(1, keepdim=True) / n
        std = torch.sqrt((centred * centred).sum(1, keepdim=True) / (n - 1))
        w = (centred / (std + eps)).reshape(w.shape)
    if lwe:
        fc1_w, fc1_b, fc2_w, fc2_b = fc
        kernel_mean = w.sum(dim=(2, 3)) / (w.shape[2] * w.shape[3])        # (out, in/g)
        hidden = torch.clamp(kernel_mean @ fc1_w.T + fc1_b, min=0)
        gate = 1.0 / (1.0 + torch.exp(-(hidden @ fc2_w.T + fc2_b)))
        w = w * gate[:, :, None, None]
    if mwe:
        m = (1 + margin) * torch.maximum(w.max(), -w.min())
        w = m * 0.5 * torch.log((1 + w / m) / (1 - w / m))
    return w


def make(shape, flags, dtype=torch.float64, seed=0):
    cin, cout, k, s, p, g = shape
    torch.manual_seed(seed)
    conv = WEConv2d(cin, cout, k, stride=s, padding=p, groups=g, **flags).to(dtype)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.lwe is not None:  # spread the gates away from 0.5
        for fc in (conv.lwe.fc1, conv.lwe.fc2):
            nn.init.normal_(fc.weight, std=1.0)
            nn.init.normal_(fc.bias, std=0.5)
    return conv


def ref_params(conv):
    """Leaf copies of the module's parameters, for the reference's own autograd graph."""
    w = conv.weight.detach().clone().requires_grad_()
    fc = None
    if conv.lwe is not None:
        fc = [t.detach().clone().requires_grad_() for t in
              (conv.lwe.fc1.weight, conv.lwe.fc1.bias, conv.lwe.fc2.weight, conv.lwe.fc2.bias)]
    return w, fc


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("flag_name", list(FLAGS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_matches_float64_reference(shape_name, flag_name):
    flags, shape = FLAGS[flag_name], SHAPES[shape_name]
    conv = make(shape, flags)
    w, fc = ref_params(conv)
    x = torch.randn(2, shape[0], 9, 9, dtype=torch.float64)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()

    ref_w = ref_excite(w, fc, **flags)
    assert rel(conv.excited_weight(), ref_w) < 1e-12
    y_ref = F.conv2d(x_ref, ref_w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    y = conv(x_ours)
    assert rel(y, y_ref) < 1e-12

    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    assert rel(conv.weight.grad, w.grad) < 1e-10
    assert rel(x_ours.grad, x_ref.grad) < 1e-10
    if fc is not None:
        ours = (conv.lwe.fc1.weight, conv.lwe.fc1.bias, conv.lwe.fc2.weight, conv.lwe.fc2.bias)
        for p, r in zip(ours, fc):
            assert rel(p.grad, r.grad) < 1e-10


@pytest.mark.parametrize("shape_name", ["dense3x3", "grouped", "depthwise"])
def test_float32_close_to_reference(shape_name):
    conv = make(SHAPES[shape_name], FLAGS["ws+lwe+mwe"], dtype=torch.float32)
    w, fc = ref_params(conv.double())
    conv.float()
    x = torch.randn(2, SHAPES[shape_name][0], 9, 9)
    ref = F.conv2d(x.double(), ref_excite(w, fc, **FLAGS["ws+lwe+mwe"]), None, conv.stride, conv.padding,
                   conv.dilation, conv.groups)
    assert rel(conv(x).double(), ref) < 1e-5


def test_lwe_widths_follow_original():
    # hidden = max(in_channels // 16, 1) with the *full* in_channels; MLP input/output = in_channels / groups
    assert WEConv2d(3, 64, 7).lwe.fc1.weight.shape == (1, 3)
    assert WEConv2d(256, 64, 1).lwe.fc1.weight.shape == (16, 256)
    assert WEConv2d(128, 128, 3, groups=32).lwe.fc1.weight.shape == (8, 4)
    dw = WEConv2d(32, 32, 3, groups=32).lwe
    assert dw.fc1.weight.shape == (2, 1) and dw.fc2.weight.shape == (1, 2) and dw.fc2.bias.shape == (1,)


def test_registered_and_keys():
    assert get_conv("we") is WEConv2d
    conv = WEConv2d(8, 4, 3, bias=True)
    assert isinstance(conv, nn.Conv2d) and isinstance(conv.weight, nn.Parameter)
    assert list(conv.state_dict()) == ["weight", "bias", "lwe.fc1.weight", "lwe.fc1.bias",
                                       "lwe.fc2.weight", "lwe.fc2.bias"]
    assert list(WEConv2d(8, 4, 3, lwe=False).state_dict()) == ["weight"]
    with pytest.raises(ValueError, match="ws"):
        WEConv2d(8, 8, 1, groups=8, ws=True)  # one weight per filter cannot be standardised


def test_mwe_from_the_first_call():
    # the original skips MWE on a layer's first call; ours applies it on every call
    conv = make(SHAPES["dense3x3"], FLAGS["lwe+mwe"])
    w, fc = ref_params(conv)
    x = torch.randn(1, 16, 5, 5, dtype=torch.float64)
    first, second = conv(x), conv(x)
    assert torch.equal(first, second)
    ref = F.conv2d(x, ref_excite(w, fc, **FLAGS["lwe+mwe"]), None, 1, 1)
    assert rel(first, ref) < 1e-12


def _randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def assert_folds(model, x):
    """fold_we(model) gives the same outputs to 1e-5 relative and holds no WE conv; returns it."""
    with torch.no_grad():
        y = model(x)
        folded = fold_we(copy.deepcopy(model))
        y_folded = folded(x)
    assert rel(y_folded, y) < 1e-5
    assert not any(isinstance(m, WEConv2d) for m in folded.modules())
    return folded


def test_fold_small_model():
    torch.manual_seed(0)

    def net(conv):
        return nn.Sequential(conv(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             conv(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             conv(8, 16, 1, bias=True))
    model = net(lambda *a, **k: WEConv2d(*a, ws=True, **k)).eval()
    _randomize_bn(model)
    folded = assert_folds(model, torch.randn(2, 3, 16, 16))
    assert all(type(m) is nn.Conv2d for m in folded.modules() if isinstance(m, nn.Conv2d))
    assert list(folded.state_dict()) == list(net(nn.Conv2d).state_dict())
    assert not folded.training
    assert type(fold_we(WEConv2d(4, 4, 3))) is nn.Conv2d


def test_fold_we_resnet18():
    cfg = {"backbone": "resnet18", "num_classes": 10, "conv": {"type": "we"}, "plugins": []}
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _randomize_bn(model)
    folded = assert_folds(model, torch.randn(2, 3, 64, 64))
    plain = build_model(dict(cfg, conv={"type": "plain"}))
    assert list(folded.state_dict()) == list(plain.state_dict())
    assert sum(isinstance(m, WEConv2d) for m in model.modules()) == 20  # stem, 16 branch, 3 downsample


def test_bf16_autocast_close_to_fp32():
    conv = make(SHAPES["dense3x3"], FLAGS["ws+lwe+mwe"], dtype=torch.float32)
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        y = conv(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_bf16 = conv(x)
            assert conv.excited_weight().dtype == torch.float32  # excitation stays in fp32
    assert y_bf16.dtype == torch.bfloat16
    assert rel(y_bf16.float(), y) < 1e-2


def test_channels_last():
    conv = make(SHAPES["grouped"], FLAGS["lwe+mwe"], dtype=torch.float32)
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        y = conv(x)
        conv_cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
        y_cl = conv_cl(x.to(memory_format=torch.channels_last))
    assert rel(y_cl, y) < 1e-5


# --- converter: WE-repo checkpoints (models/imagenet/resnet.py l_resnet*, models/layers.py Conv2d) ---

def _orig_conv(sd, name, cin, cout, k, gen):
    """Keys the original's layers.Conv2d(cin, cout, k, bias=False) saves: weight + fc1/fc2 1x1 convs."""
    hidden = max(cin // 16, 1)
    sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cout * k * k)) ** 0.5
    sd[f"{name}.fc1.weight"] = torch.randn(hidden, cin, 1, 1, generator=gen)
    sd[f"{name}.fc1.bias"] = torch.randn(hidden, generator=gen)
    sd[f"{name}.fc2.weight"] = torch.randn(cin, hidden, 1, 1, generator=gen)
    sd[f"{name}.fc2.bias"] = torch.randn(cin, generator=gen)


def _orig_bn(sd, name, c, gen):
    sd[f"{name}.weight"] = torch.rand(c, generator=gen) + 0.5
    sd[f"{name}.bias"] = torch.randn(c, generator=gen) * 0.1
    sd[f"{name}.running_mean"] = torch.randn(c, generator=gen) * 0.1
    sd[f"{name}.running_var"] = torch.rand(c, generator=gen) + 0.5
    sd[f"{name}.num_batches_tracked"] = torch.tensor(100)


def fake_l_resnet18_checkpoint(num_classes=10):
    """What the WE repo's imagenet.py saves for l_resnet18 (DataParallel-wrapped), built by hand."""
    gen = torch.Generator().manual_seed(0)
    sd = {}
    _orig_conv(sd, "conv1", 3, 64, 7, gen)
    _orig_bn(sd, "bn1", 64, gen)
    inplanes = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"layer{stage}.{b}"
            _orig_conv(sd, f"{p}.conv1", inplanes, planes, 3, gen)
            _orig_bn(sd, f"{p}.bn1", planes, gen)
            _orig_conv(sd, f"{p}.conv2", planes, planes, 3, gen)
            _orig_bn(sd, f"{p}.bn2", planes, gen)
            if b == 0 and stage > 1:
                _orig_conv(sd, f"{p}.downsample.0", inplanes, planes, 1, gen)
                _orig_bn(sd, f"{p}.downsample.1", planes, gen)
            inplanes = planes
    sd["fc.weight"] = torch.randn(num_classes, 512, generator=gen) * 0.01
    sd["fc.bias"] = torch.zeros(num_classes)
    return {"epoch": 90, "state_dict": {f"module.{k}": v for k, v in sd.items()},
            "acc": 70.0, "best_acc": 70.0, "optimizer": {}}


def test_converter_detect():
    ckpt = fake_l_resnet18_checkpoint()
    assert werepo.detect(ckpt) and werepo.detect(ckpt["state_dict"])
    plain = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512),
             "fc.bias": torch.zeros(10)}
    assert not werepo.detect(plain)
    assert not werepo.detect(nn.Sequential(WEConv2d(8, 8, 3)).state_dict())  # ours
    assert not werepo.detect({"layer1.0.se.fc1.weight": torch.zeros(4, 16, 1, 1)})  # an SE block, not a conv


def test_converter_renames_lwe_keys():
    sd = werepo.convert(fake_l_resnet18_checkpoint())
    assert "layer2.0.downsample.0.lwe.fc1.weight" in sd and "conv1.lwe.fc2.bias" in sd
    assert sd["conv1.lwe.fc1.weight"].shape == (1, 3) and sd["layer1.0.conv1.lwe.fc1.weight"].shape == (4, 64)
    assert not any(k.startswith("module.") or ".fc1." in k.replace(".lwe.fc1.", "") for k in sd)
    assert sd["fc.weight"].shape == (10, 512)


def test_converter_loads_into_we_resnet18():
    ckpt = fake_l_resnet18_checkpoint()
    model = build_model({"backbone": "resnet18", "num_classes": 10,
                         "conv": {"type": "we", "lwe": True, "mwe": False, "ws": False}, "plugins": []})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # LWE-only model: no warning
        sd = werepo.convert(ckpt["state_dict"], model)
    model.load_state_dict(sd, strict=True)
    orig = {k[len("module."):]: v.double() for k, v in ckpt["state_dict"].items()}
    for name in ("conv1", "layer3.1.conv2", "layer4.0.downsample.0"):
        fc = [orig[f"{name}.{f}.{p}"].flatten(1) if p == "weight" else orig[f"{name}.{f}.{p}"]
              for f in ("fc1", "fc2") for p in ("weight", "bias")]
        ref = ref_excite(orig[f"{name}.weight"], fc, lwe=True, mwe=False, ws=False)
        assert rel(model.get_submodule(name).excited_weight().double(), ref) < 1e-6
    with pytest.warns(UserWarning, match="LWE only"):
        werepo.convert(ckpt, build_model({"backbone": "resnet18", "num_classes": 10,
                                          "conv": {"type": "we"}, "plugins": []}))


# --- fast path: hand-written MWE backward, eval cache, compile friendliness ---

def test_grads_match_reference_channels_last_and_zero_weight():
    conv = make(SHAPES["dense3x3"], FLAGS["lwe+mwe"])
    w, fc = ref_params(conv)
    conv = conv.to(memory_format=torch.channels_last)
    g = torch.randn(8, 16, 3, 3, dtype=torch.float64)
    conv.excited_weight().backward(g)
    ref_excite(w, fc, **FLAGS["lwe+mwe"]).backward(g)
    assert rel(conv.weight.grad, w.grad) < 1e-10
    zero = make(SHAPES["dense3x3"], FLAGS["mwe"])
    with torch.no_grad():
        zero.weight.zero_()
    out = zero.excited_weight()
    out.backward(torch.ones_like(out))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(zero.weight.grad).all()


def test_eval_cache_follows_parameter_updates():
    conv = make(SHAPES["dense3x3"], FLAGS["lwe+mwe"], dtype=torch.float32).eval()
    x = torch.randn(1, 16, 5, 5)
    with torch.no_grad():
        y1 = conv(x)
        assert conv._cache is not None and torch.equal(conv(x), y1)
        conv.lwe.fc2.bias.add_(1.0)  # in-place update -> recomputed
        y2 = conv(x)
        ref = F.conv2d(x, conv.excited_weight(), None, 1, 1)
    assert not torch.equal(y2, y1) and torch.equal(y2, ref)
    conv.train()
    y3 = conv(x)
    y3.sum().backward()
    assert conv.weight.grad is not None  # training never uses the cache


def test_no_graph_breaks():
    dynamo = pytest.importorskip("torch._dynamo")
    model = nn.Sequential(WEConv2d(3, 8, 3, padding=1), nn.ReLU(), WEConv2d(8, 8, 1, ws=True),
                          WEConv2d(8, 8, 3, padding=1, lwe=False))
    x = torch.randn(1, 3, 8, 8)
    for m in (model.train(), model.eval()):
        dynamo.reset()
        assert dynamo.explain(m)(x).graph_break_count == 0
