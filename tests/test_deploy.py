"""Inference form and exports (issue 13, item 3): folded == eval, exported == eager, tools.deploy."""
import io
import warnings

import pytest
import torch

from blocks.ed import ED


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _ed_block():
    torch.manual_seed(0)
    m = ED(64, groups=8).eval()
    with torch.no_grad():
        for bn in (m.encoder_bn, m.decoder_bn):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m


def test_ed_onnx_made_at_one_size_runs_at_others():
    """The decoder's output padding was fixed at trace time (output_size=x.shape): a file made at 64 px
    failed at sizes of the other parity. Now it follows the input's shape."""
    ort = pytest.importorskip("onnxruntime")
    m = _ed_block()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(2, 64, 16, 16),), f, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    for hw in ((16, 16), (20, 20), (15, 15), (9, 12), (18, 24)):
        x = torch.randn(2, 64, *hw)
        y = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        with torch.no_grad():
            ref = m(x)
        assert y.shape == ref.shape and _rel(y, ref) < 1e-5, hw


def test_ed_traced_and_exported_with_dynamic_dims_run_at_other_sizes():
    m = _ed_block()
    x0 = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        traced = torch.jit.trace(m, (x0,), check_trace=False)
    dyn = torch.export.Dim.DYNAMIC
    ep = torch.export.export(m, (x0,), dynamic_shapes=({0: dyn, 2: dyn, 3: dyn},)).module()
    for hw in ((15, 15), (9, 12), (20, 20)):
        x = torch.randn(2, 64, *hw)
        with torch.no_grad():
            ref = m(x)
            assert _rel(traced(x), ref) < 1e-6 and _rel(ep(x), ref) < 1e-6, hw


@pytest.mark.parametrize("train", [False, True])
def test_ed_traced_form_equals_eager_at_odd_and_even_sizes(train):
    """The traced path (zero row + crop) equals the eager transposed conv at output_size=."""
    from blocks.ed import crop_to
    m = _ed_block().double().train(train)
    for hw in ((16, 16), (15, 15), (9, 12), (7, 7), (1, 1), (2, 3)):
        x = torch.randn(2, 64, *hw, dtype=torch.float64)
        e = m.relu(m.encoder_bn(m.encoder_conv(x)))
        eager = m.decoder_conv(e, output_size=x.shape[-2:])
        traced = crop_to(m.decoder_conv(torch.nn.functional.pad(e, (0, 1, 0, 1))), x)
        assert eager.shape == traced.shape and torch.allclose(eager, traced, rtol=0, atol=1e-13), hw


# ----------------------------------------------------------------------------- the inference form
import copy  # noqa: E402

from models import build_model  # noqa: E402
from models.inference import relative_error, to_inference  # noqa: E402

CIFAR = {"backbone": "cifar_resnet20", "num_classes": 10}
# the blocks with the options of their real configs (configs/ablation, configs/imagenet/*)
BLOCKS = {
    "plain": {},
    "ce": {"plugins": [{"type": "ce", "position": "after_norm", "stages": [1, 2, 3], "stem": True}]},
    "ed": {"plugins": [{"type": "ed", "position": "parallel", "groups": 4}]},
    "we": {"conv": {"type": "we", "lwe": True, "mwe": True, "ws": False}},
    "se": {"plugins": [{"type": "se", "position": "after_norm", "reduction": 16}]},
    "ed_se": {"plugins": [{"type": "se", "position": "after_norm", "reduction": 16},
                          {"type": "ed", "position": "parallel", "groups": 4}]},
}


def trained_like(model, seed=1):
    """Non-trivial running statistics and affine parameters, as a trained model has (identity BNs and
    an identity whitening matrix would hide folding mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
            if hasattr(m, "running_wm"):
                d = m.running_wm.shape[-1]
                m.running_wm.copy_(torch.eye(d) + 0.1 * torch.randn(m.running_wm.shape, generator=g))
                m.ir.running_scale.fill_(1.7)
                m.theta.fill_(0.3)
    return model.eval()


def build(cfg, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return trained_like(build_model(cfg).to(dtype))


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_inference_form_equals_eval_model_cifar(block):
    model = build({**CIFAR, **BLOCKS[block]}, torch.float64)
    before = copy.deepcopy(model.state_dict())
    inf = to_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in inf.modules())  # every BN folded
    assert inf.inference_summary["conv_bn_folded"] == 19
    x = torch.randn(2, 3, 33, 31, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(inf(x), model(x)) < 1e-12
    after = model.state_dict()  # the original is untouched
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("backbone,extra,size", [
    ("resnet18", BLOCKS["ed_se"], 45),
    ("resnet18", {"conv": {"type": "we", "lwe": True, "mwe": True}}, 40),
    ("resnet50", {"plugins": [{"type": "ce", "stages": [1, 2, 3], "stem": True, "group_channels": 16,
                               "newton_iters": 3}]}, 48),
    ("mobilenet_v2", {"plugins": [{"type": "ce", "stem": True, "group_channels": 16,
                                   "stem_group_channels": 32}]}, 40),
])
def test_inference_form_equals_eval_model_imagenet_backbones(backbone, extra, size):
    model = build({"backbone": backbone, "num_classes": 10, **extra}, torch.float64)
    inf = to_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in inf.modules())
    assert not any(type(m).__name__ in ("CE", "ED", "WEConv2d") for m in inf.modules())
    x = torch.randn(2, 3, size, size + 3, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(inf(x), model(x)) < 1e-12


def test_ce_inference_equals_ce_eval_nchw_channels_last_and_1x1_maps():
    from blocks.ce import CE
    torch.manual_seed(0)
    ce = CE(48, group_channels=16)
    ce.train()(torch.randn(8, 48, 6, 6) * 2 + 1)  # real running statistics
    ce.theta.data.fill_(-0.4)
    ce.eval()
    inf = ce.deploy()
    for shape in ((3, 48, 7, 5), (2, 48, 1, 1), (2, 48, 1, 3)):
        x = torch.randn(*shape) * 3 + 0.5
        with torch.no_grad():
            assert relative_error(inf(x), ce(x)) < 1e-6, shape
            xc = x.contiguous(memory_format=torch.channels_last)
            assert relative_error(inf(xc), ce(xc)) < 1e-6, shape


def test_fold_bn_grouped_transposed_conv():
    from blocks.deploy import fold_bn
    torch.manual_seed(0)
    conv = torch.nn.ConvTranspose2d(16, 32, 3, stride=2, padding=1, groups=4, bias=True).double()
    bn = trained_like(torch.nn.Sequential(torch.nn.BatchNorm2d(32))).double()[0]
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(fold_bn(conv, bn)(x, output_size=(9, 10)), bn(conv(x, output_size=(9, 10)))) < 1e-13


def test_bn_not_folded_when_the_conv_output_is_used_twice():
    class TwoUses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    m = trained_like(TwoUses())
    inf = to_inference(m)
    assert isinstance(inf.bn, torch.nn.BatchNorm2d) and inf.inference_summary["conv_bn_folded"] == 0
