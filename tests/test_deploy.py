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
