"""CE block (blocks/ce.py) against an independent float64 reference of the CENet formulas.

The reference below is written from the formulas (loops over samples and groups, explicit
matrices); it shares no code with blocks/ce.py. Shapes are tiny so the file runs in seconds.
"""
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import blocks.ce as ce_mod
import blocks.ce_ops as ce_ops
from blocks.ce import CE
from blocks.registry import get_block
from models.converters import cenet

EPS = 1e-5
MOMENTUM = 0.1


# ----------------------------------------------------------------------------- reference
def ref_group_size(c, g):
    while c % g != 0:
        g //= 2
    return g


def ref_ce(x, p, state, group, iters=3, training=True, pooling=False):
    """CE of the CENet code, float64, written out; returns the output and the new running state.

    p: theta, w1 (C/4, C), ln_w, ln_b (C/4), w2 (C, C/4). state: running_wm (g, d, d),
    running_mean (g, d), running_scale (1,).
    """
    n, c, h, w = x.shape
    d = ref_group_size(c, group)
    groups = c // d
    new_state = {k: v.clone() for k, v in state.items()}

    # IR: per-sample channel variance -> FC -> LayerNorm -> ReLU -> FC -> sigmoid, / sqrt(mean var)
    var = torch.stack([torch.stack([x[i, j].flatten().var(unbiased=True) for j in range(c)]) for i in range(n)])
    hid = var @ p["w1"].t()
    mu = hid.mean(1, keepdim=True)
    sd = ((hid - mu) ** 2).mean(1, keepdim=True).add(1e-5).sqrt()
    hid = torch.relu((hid - mu) / sd * p["ln_w"] + p["ln_b"])
    y = torch.sigmoid(hid @ p["w2"].t())
    if training:
        scale = var.mean().sqrt()
        new_state["running_scale"] = (1 - MOMENTUM) * state["running_scale"] + MOMENTUM * scale.detach()
    else:
        scale = state["running_scale"]
    ir = x * (y / scale)[:, :, None, None]

    # BD: per group of d channels, Newton iterations on the trace-normalised covariance
    src_all = F.max_pool2d(x, 2, 2) if pooling else x
    m = n * h * w
    bd_groups = []
    for k in range(groups):
        chans = slice(k * d, (k + 1) * d)
        xs = x[:, chans].permute(1, 0, 2, 3).reshape(d, -1)        # (d, N*H*W)
        if training:
            src = src_all[:, chans].permute(1, 0, 2, 3).reshape(d, -1)
            mean = src.mean(1, keepdim=True)
            xc = src - mean
            sigma = EPS * torch.eye(d, dtype=x.dtype) + xc @ xc.t() / m
            sigma_n = sigma / torch.trace(sigma)
            pk = torch.eye(d, dtype=x.dtype)
            for _ in range(iters):
                pk = 1.5 * pk - 0.5 * pk @ pk @ pk @ sigma_n
            new_state["running_wm"][k] = (1 - MOMENTUM) * state["running_wm"][k] + MOMENTUM * pk.detach()
            new_state["running_mean"][k] = (1 - MOMENTUM) * state["running_mean"][k] + MOMENTUM * mean[:, 0].detach()
        else:
            pk = state["running_wm"][k]
        bd_groups.append((pk @ xs).reshape(d, n, h, w).permute(1, 0, 2, 3))
    bd = torch.cat(bd_groups, 1)
    a = torch.sigmoid(p["theta"])
    return a * bd + (1 - a) * ir, new_state


def ref_params(module):
    return {"theta": module.theta, "w1": module.ir.fc1.weight, "ln_w": module.ir.norm.weight,
            "ln_b": module.ir.norm.bias, "w2": module.ir.fc2.weight}


def ref_state(module):
    return {"running_wm": module.running_wm.clone(), "running_mean": module.running_mean.clone(),
            "running_scale": module.ir.running_scale.clone()}


def make(c, group=16, seed=0, dtype=torch.float64, **kw):
    """A CE whose parameters are moved off their init (the same values for any dtype)."""
    torch.manual_seed(seed)
    m = CE(c, group_channels=group, **kw)
    with torch.no_grad():
        for prm in m.parameters():
            prm.add_(0.2 * torch.randn_like(prm))
    return m.to(dtype)


def batch(n, c, h, w, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # per-channel offsets and scales, like a BN output with learned beta/gamma
    return (torch.randn(n, c, h, w, generator=g, dtype=dtype) * (0.5 + torch.rand(1, c, 1, 1, generator=g))
            + torch.randn(1, c, 1, 1, generator=g)).to(dtype)


# ----------------------------------------------------------------------------- tests
FORMATS = [torch.contiguous_format, torch.channels_last]


# channels_last has two kernel forms: one strided bmm per sample (CPU eager) and the batched one
# (GPUs, traced graphs), forced here on CPU so both are checked against the reference
LAYOUTS = [(torch.contiguous_format, True), (torch.channels_last, True), (torch.channels_last, False)]
LAYOUT_IDS = ["nchw", "channels_last", "channels_last_batched"]


@pytest.mark.parametrize("fmt,loop", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("c,group,pooling", [(32, 16, False), (24, 16, False), (16, 64, False), (32, 8, True)])
def test_train_forward_and_gradients_match_reference(c, group, pooling, fmt, loop, monkeypatch):
    if not loop:
        monkeypatch.setattr(ce_ops, "loops_over_samples", lambda x: False)
    m = make(c, group, pooling=pooling)
    x = batch(3, c, 6, 5, seed=1).contiguous(memory_format=fmt).requires_grad_()
    params = {k: v.detach().clone().requires_grad_() for k, v in ref_params(m).items()}
    xr = x.detach().contiguous().requires_grad_()
    state = ref_state(m)
    out = m(x)
    ref, new_state = ref_ce(xr, params, state, group, pooling=pooling)
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(ref)
    (out * go).sum().backward()
    (ref * go).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-10)
    for name, prm in ref_params(m).items():
        torch.testing.assert_close(prm.grad, params[name].grad, rtol=1e-9, atol=1e-10, msg=name)
    torch.testing.assert_close(m.running_wm, new_state["running_wm"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.running_mean, new_state["running_mean"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.ir.running_scale, new_state["running_scale"], rtol=1e-10, atol=1e-12)


def test_gradients_without_the_shared_buffer_match(monkeypatch):
    # under torch.compile the two gradient terms wrt x are summed by autograd instead: same result
    m = make(32, 16)
    x = batch(3, 32, 6, 5, seed=2).requires_grad_()
    go = torch.randn(3, 32, 6, 5, dtype=torch.float64)
    (m(x) * go).sum().backward()
    linked = [x.grad] + [p.grad.clone() for p in m.parameters()]
    m.zero_grad(), m.reset_running_stats()
    monkeypatch.setattr(ce_mod, "GradLink", lambda: None)
    x2 = x.detach().clone().requires_grad_()
    (m(x2) * go).sum().backward()
    for a, b in zip(linked, [x2.grad] + [p.grad for p in m.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_parameter_gradients_when_the_input_needs_none():
    m, ref = make(32, 16), make(32, 16)
    x = batch(3, 32, 6, 5, seed=3)
    (m(x) ** 2).sum().backward()
    (ref(x.clone().requires_grad_()) ** 2).sum().backward()
    for (name, a), b in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-13, msg=name)


@pytest.mark.parametrize("fmt,loop", LAYOUTS, ids=LAYOUT_IDS)
def test_running_statistics_and_eval_match_reference(fmt, loop, monkeypatch):
    if not loop:
        monkeypatch.setattr(ce_ops, "loops_over_samples", lambda x: False)
    c, group = 32, 16
    m = make(c, group, seed=3)
    params = {k: v.detach().clone() for k, v in ref_params(m).items()}
    state = ref_state(m)
    for step in range(4):
        x = batch(4, c, 5, 5, seed=10 + step).contiguous(memory_format=fmt)
        with torch.no_grad():
            m(x)
        _, state = ref_ce(x, params, state, group)
    torch.testing.assert_close(m.running_wm, state["running_wm"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.running_mean, state["running_mean"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.ir.running_scale, state["running_scale"], rtol=1e-10, atol=1e-12)
    m.eval()
    x = batch(2, c, 5, 5, seed=99).contiguous(memory_format=fmt).requires_grad_()
    xr = x.detach().contiguous().requires_grad_()
    out = m(x)
    ref, after = ref_ce(xr, params, state, group, training=False)
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(m.running_wm, after["running_wm"])  # eval leaves the buffers alone


def test_eval_before_any_training_step_is_finite():
    m = CE(64).eval()
    x = torch.randn(2, 64, 4, 4) * 3 + 1
    out = m(x)
    assert torch.isfinite(out).all()
    # identity whitening and unit scale: BD(x) = x, IR(x) = y * x
    assert torch.equal(m.running_wm, torch.eye(16).repeat(4, 1, 1))
    assert m.ir.running_scale.item() == 1.0


def test_single_pixel_input_is_finite():
    m = CE(32)
    out = m(torch.randn(4, 32, 1, 1))
    assert torch.isfinite(out).all()


def test_float16_single_pixel_maps_stay_in_range():
    # 1x1 maps have no spatial variance, so s sits at its floor: with the floor at eps, IR's gain was
    # ~2.5e4 and fp16 outputs inf (NaN losses in CE-MobileNetV2 at 32x32); now s >= sqrt(eps)
    m = make(32, 16, dtype=torch.float32)
    x = batch(4, 32, 1, 1, seed=7, dtype=torch.float32).half().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        out = m(x)
    assert out.dtype == torch.float16
    assert torch.isfinite(out + out).all()  # a residual add of two such outputs stays in range too
    out.float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.theta.grad).all()
    torch.testing.assert_close(m.ir.running_scale, torch.tensor([0.9 + 0.1 * EPS ** 0.5]))


def test_non_finite_batch_leaves_running_buffers_alone():
    m = make(32, 16, dtype=torch.float32)
    before = ref_state(m)
    x = batch(2, 32, 4, 4, seed=8, dtype=torch.float32)
    x[0, 3, 1, 1] = float("inf")  # e.g. an fp16 overflow upstream, in a step GradScaler will skip
    m(x)
    for name, buf in ref_state(m).items():
        assert torch.equal(buf, before[name]), name


@pytest.mark.parametrize("c,group,expect", [(24, 16, 8), (64, 16, 16), (64, 64, 64), (6, 16, 2), (7, 16, 1)])
def test_group_size_halves_until_it_divides(c, group, expect):
    m = CE(c, group_channels=group)
    assert m.group_channels == expect and m.num_groups == c // expect
    assert m.running_wm.shape == (c // expect, expect, expect)
    assert m(torch.randn(2, c, 3, 3)).shape == (2, c, 3, 3)


def test_channels_last_gives_the_same_result():
    m = make(32, 16, dtype=torch.float32)
    x = batch(2, 32, 6, 6, seed=4, dtype=torch.float32)
    xa = x.clone().requires_grad_()
    xb = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    m2 = make(32, 16, dtype=torch.float32)
    go = torch.randn_like(x)
    ya, yb = m(xa), m2(xb)
    assert yb.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ya, yb)
    (ya * go).sum().backward()
    (yb * go).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(m.running_wm, m2.running_wm)
    m.eval(), m2.eval()
    torch.testing.assert_close(m(x), m2(x.contiguous(memory_format=torch.channels_last)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_channels_last_inference_equals_nchw(dtype):
    # without autograd, channels_last eval on CPU takes its own path (one strided bmm per sample
    # writing into the centred copy): it must give the NCHW result, running statistics included
    m = make(64, 16, dtype=torch.float32)
    m(batch(6, 64, 5, 5, seed=2, dtype=torch.float32))  # running buffers off their init
    m.eval()
    x = batch(3, 64, 7, 5, seed=8, dtype=torch.float32).to(dtype)
    if dtype == torch.float64:
        m.double()
    with torch.no_grad():
        ref, out = m(x), m(x.contiguous(memory_format=torch.channels_last))
        with torch.enable_grad():
            autograd_path = m(x.contiguous(memory_format=torch.channels_last))
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(out, autograd_path.detach(), **tol)


def test_wide_channels_last_matches_nchw():
    # from 1024 channels the per-sample matmul writes a contiguous result and copies it (another code path)
    m, m2 = make(1024, 16), make(1024, 16)
    x = batch(2, 1024, 3, 3, seed=6)
    xa, xb = x.clone().requires_grad_(), x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    go = torch.randn_like(x)
    (m(xa) * go).sum().backward()
    (m2(xb) * go).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
    m.eval(), m2.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m2(x.contiguous(memory_format=torch.channels_last)), rtol=1e-10, atol=1e-10)


class _Allocations(TorchDispatchMode):
    """Counts the aten ops that write a new tensor of at least ``numel`` elements (views excluded)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)}
        self.ops += [func.__name__ for t in tree_flatten(out)[0] if torch.is_tensor(t) and t.numel() >= self.numel
                     and t.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_makes_no_extra_activation_copies(training):
    # CE used to convert channels_last input to NCHW and back: 3 activation-sized copies per
    # training step, 2 in eval; it now works on the NHWC layout directly
    counts = {}
    for fmt in FORMATS:
        m = make(32, 16, dtype=torch.float32).train(training)
        x = batch(4, 32, 8, 8, seed=9, dtype=torch.float32).contiguous(memory_format=fmt).requires_grad_(training)
        go = torch.randn_like(x)
        with _Allocations(x.numel()) as seen, torch.set_grad_enabled(training):  # eval: inference
            out = m(x)
            if training:
                out.backward(go)
        assert out.is_contiguous(memory_format=fmt) and (not training or x.grad.is_contiguous(memory_format=fmt))
        counts[fmt] = [op for op in seen.ops if op.split(".")[0] in ("clone", "copy_", "_to_copy")]
    assert counts[torch.channels_last] == counts[torch.contiguous_format] == [], counts


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
def test_bf16_autocast_statistics_in_float32(monkeypatch, fmt):
    seen = []
    real = ce_mod.newton_isqrt

    def spy(sigma_n, iters):
        seen.append(sigma_n.dtype)
        return real(sigma_n, iters)

    monkeypatch.setattr(ce_mod, "newton_isqrt", spy)
    m32 = make(64, 16, dtype=torch.float32)
    m16 = make(64, 16, dtype=torch.float32)
    x = batch(4, 64, 8, 8, seed=5, dtype=torch.float32).bfloat16().contiguous(memory_format=fmt)
    ref = m32(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m16(x)
    assert seen == [torch.float32, torch.float32]
    assert out.dtype == torch.bfloat16
    assert m16.running_wm.dtype == torch.float32
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 1e-2, rel
    torch.testing.assert_close(m16.running_wm, m32.running_wm, rtol=1e-4, atol=1e-5)
    m32.eval(), m16.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m16(x)
    ref = m32(x.float())
    assert out.dtype == torch.bfloat16 and (out.float() - ref).norm() / ref.norm() < 1e-2


def test_float16_input_keeps_dtype_and_is_finite():
    m = make(32, 16, dtype=torch.float32)
    x = (batch(2, 32, 48, 48, seed=6, dtype=torch.float32) * 2 + 40).half()  # sums beyond the fp16 range
    out = m(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref = make(32, 16, dtype=torch.float32)(x.float())
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "channels_last"])
def test_compiles_without_graph_breaks(fmt):
    m = make(32, 16, dtype=torch.float32)
    eager = make(32, 16, dtype=torch.float32)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    x = batch(2, 32, 4, 4, seed=7, dtype=torch.float32).contiguous(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = compiled(xa), eager(xb)
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward(), yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(m.theta.grad, eager.theta.grad)
    torch.testing.assert_close(m.running_wm, eager.running_wm)
    m.eval(), eager.eval()
    torch.testing.assert_close(compiled(x), eager(x))


def test_export_matches_eager():
    # torch.export (what tools/export.py's ONNX path builds on) sees the same functional forward
    m = make(32, 16, dtype=torch.float32).eval()
    x = batch(2, 32, 4, 4, seed=7, dtype=torch.float32)
    for fmt in FORMATS:
        xf = x.contiguous(memory_format=fmt)
        ep = torch.export.export(m, (xf,))
        torch.testing.assert_close(ep.module()(xf), m(xf))


def test_registered_with_stem_option():
    cls = get_block("ce")
    assert cls is CE and cls.stem_ok and cls.positions == ("after_norm",)
    opts = CE.stem_options(group_channels=16, newton_iters=3)
    assert CE(64, **opts).group_channels == 64 and CE(64, **opts).num_groups == 1


def test_variance_with_large_channel_offset():
    # float32 sums: a channel with mean 50 and std 0.1 must still get a sensible variance
    m = make(16, 16, dtype=torch.float32)
    x = torch.randn(4, 16, 8, 8) * 0.1 + 50
    ref_m = make(16, 16, dtype=torch.float64)
    out, ref = m(x), ref_m(x.double())
    assert (out.double() - ref).abs().max() / ref.abs().max() < 1e-4


# ----------------------------------------------------------------------------- conversion
def cenet_ce_state(c, g, seed):
    """A CE state dict under the CENet code's own names (devkit/ops/CE_module.py)."""
    torch.manual_seed(seed)
    d = ref_group_size(c, g)
    return {
        "running_mean": torch.randn(c // d, d, 1),
        "running_wm": torch.eye(d).expand(c // d, d, d) + 0.01 * torch.randn(c // d, d, d),
        "x_weight": torch.randn(1),
        "AR.running_scale": torch.rand(1) + 0.5,
        "AR.fc.0.weight": torch.randn(c // 4, c),
        "AR.fc.1.weight": torch.randn(c // 4),
        "AR.fc.1.bias": torch.randn(c // 4),
        "AR.fc.3.weight": torch.randn(c, c // 4),
    }


class TinyHost(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 3, bias=False)
        self.stem_ce = CE(64, group_channels=64)
        self.layer1 = torch.nn.Sequential(torch.nn.Module())
        self.layer1[0].ce = CE(32, group_channels=16)


@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict"])
def test_converter_maps_cenet_checkpoint(wrap):
    stem = cenet_ce_state(64, 64, seed=1)
    block = cenet_ce_state(32, 16, seed=2)
    sd = {"conv1.weight": torch.randn(64, 3, 3, 3)}
    sd.update({f"ce1.{k}": v for k, v in stem.items()})
    sd.update({f"layer1.0.ce.{k}": v for k, v in block.items()})
    if wrap == "module":
        sd = {"module." + k: v for k, v in sd.items()}
    elif wrap == "state_dict":
        sd = {"epoch": 100, "model": "resnetv1ce50", "state_dict": sd, "best_prec1": 78.2, "optimizer": {}}
    assert cenet.detect(sd)
    assert not cenet.detect({"conv1.weight": torch.zeros(1), "layer1.0.bn3.running_mean": torch.zeros(1)})
    host = TinyHost()
    converted = cenet.convert(sd, host)
    host.load_state_dict(converted, strict=True)
    for prefix, src in (("stem_ce", stem), ("layer1.0.ce", block)):
        mod = host.get_submodule(prefix)
        assert torch.equal(mod.theta, src["x_weight"])
        assert torch.equal(mod.running_mean, src["running_mean"][..., 0])
        assert torch.equal(mod.running_wm, src["running_wm"])
        assert torch.equal(mod.ir.running_scale, src["AR.running_scale"])
        assert torch.equal(mod.ir.fc1.weight, src["AR.fc.0.weight"])
        assert torch.equal(mod.ir.norm.weight, src["AR.fc.1.weight"])
        assert torch.equal(mod.ir.norm.bias, src["AR.fc.1.bias"])
        assert torch.equal(mod.ir.fc2.weight, src["AR.fc.3.weight"])
    assert converted["stem_ce.running_wm"].is_contiguous()
    # a converted module trains: its buffers take in-place updates
    host.stem_ce(torch.randn(2, 64, 3, 3))
    assert math.isfinite(host.stem_ce.running_wm.sum().item())


# ----------------------------------------------------------------------------- distributed statistics
def _sync_worker(rank, world, init_file, x, go, state, result_file, compiled=False):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = CE(32, group_channels=16, sync_stats=True).double()
        m.load_state_dict(state)
        part = x.chunk(world)[rank].clone().requires_grad_()
        # fullgraph: any graph break (the deprecated differentiable all_reduce made 5 per call) is an error;
        # aot_eager traces forward and backward, collectives included, without inductor's C++ build
        out = (torch.compile(m, backend="aot_eager", fullgraph=True) if compiled else m)(part)
        (out * go.chunk(world)[rank]).sum().backward()
        torch.save({"out": out.detach(), "grad": part.grad, "wm": m.running_wm, "scale": m.ir.running_scale},
                   f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_sync_stats_matches_single_process_full_batch(tmp_path, compiled):
    import torch.multiprocessing as mp
    torch.manual_seed(0)
    ref = make(32, 16)
    x = batch(4, 32, 5, 5, seed=8)
    go = torch.randn(4, 32, 5, 5, dtype=torch.float64)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    xr = x.clone().requires_grad_()
    out = ref(xr)
    (out * go).sum().backward()
    # fork: the workers need no fresh interpreter (spawn would re-import torch, several seconds)
    ctx = mp.start_processes(_sync_worker, args=(2, str(tmp_path / "init"), x, go, state, str(tmp_path / "res"), compiled),
                             nprocs=2, start_method="fork", join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("sync_stats workers did not finish within 120 s")
    parts = [torch.load(tmp_path / f"res.{r}") for r in range(2)]
    torch.testing.assert_close(torch.cat([p["out"] for p in parts]), out.detach())
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]), xr.grad)
    for p in parts:
        torch.testing.assert_close(p["wm"], ref.running_wm)
        torch.testing.assert_close(p["scale"], ref.ir.running_scale)
