"""Inference form and exports (issue 13, item 3): folded == eval, exported == eager, tools.deploy.

torch.export (and the dynamo ONNX exporter built on it) leaves the process's autograd engine starting
worker threads at its next backward, after which fork-based multiprocessing (test_ce's sync_stats
workers, ...) fails with "Unable to handle autograd's threading in combination with fork-based
multiprocessing". So every torch.export here runs in one spawned worker process (``export_worker``).
"""
import concurrent.futures
import copy
import io
import multiprocessing
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

from blocks.ed import ED
from models import build_model
from models.inference import relative_error, to_inference

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def export_worker():
    """Runs a module-level function of this file in a spawned process (see the module doc)."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda fn, *args: pool.submit(fn, *args).result(timeout=600)


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


ED_SIZES = ((2, 15, 15), (2, 9, 12), (3, 20, 20))


def ed_export_errors():
    """Relative errors of the ED block exported by torch.export at 16 px with dynamic dims, at ED_SIZES."""
    m = _ed_block()
    dyn = torch.export.Dim.DYNAMIC
    ep = torch.export.export(m, (torch.randn(2, 64, 16, 16),), dynamic_shapes=({0: dyn, 2: dyn, 3: dyn},)).module()
    errs = []
    for shape in ED_SIZES:
        x = torch.randn(shape[0], 64, *shape[1:])
        with torch.no_grad():
            errs.append(_rel(ep(x), m(x)))
    return errs


def test_ed_traced_and_exported_with_dynamic_dims_run_at_other_sizes(export_worker):
    m = _ed_block()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, (torch.randn(2, 64, 16, 16),), check_trace=False)
    for shape in ED_SIZES:
        x = torch.randn(shape[0], 64, *shape[1:])
        with torch.no_grad():
            assert _rel(traced(x), m(x)) < 1e-6, shape
    assert max(export_worker(ed_export_errors)) < 1e-6


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
    from blocks.fusion import fold_bn
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


# ----------------------------------------------------------------------------- exports
def _onnx_runner(model, x, dynamic=True):
    ort = pytest.importorskip("onnxruntime")
    from models.export import export_bytes
    session = ort.InferenceSession(export_bytes(model, x, "onnx", dynamic), providers=["CPUExecutionProvider"])
    return lambda z: torch.from_numpy(session.run(None, {"input": z.numpy()})[0])


def test_legacy_onnx_of_eval_ce_is_never_silently_wrong():
    """The legacy exporter dropped CE's in-place ``mix.diagonal().add_(gain)`` on a view: the ONNX file
    ran without IR's gains. CE now builds the mix with diag_embed, which that exporter refuses (no ONNX
    op); the dynamo exporter and the inference form export it right. Seen failing with the in-place line."""
    model = build({**CIFAR, **BLOCKS["ce"]})
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    try:
        run = _onnx_runner(model, x)
    except Exception as exc:  # refused loudly is fine; wrong numbers are not
        assert "diag_embed" in str(exc)
    else:
        assert relative_error(run(x), ref) < 1e-4
    assert relative_error(_onnx_runner(to_inference(model), x)(x), ref) < 1e-4


ROUND_TRIP_SIZES = ((2, 32, 32), (3, 40, 40), (2, 36, 48), (2, 33, 27))


def round_trip_errors(cfg, fmt, sizes=ROUND_TRIP_SIZES, onnx_exporter="legacy"):
    """Relative errors vs eager eval of ``cfg``'s inference form exported (dynamic) at ``sizes[0]`` as
    tools.deploy does and run back by the format's runtime at each of ``sizes``."""
    from models.export import export_bytes, runner
    model = build(cfg)
    xs = [torch.randn(n, 3, h, w) for n, h, w in sizes]
    run = runner(export_bytes(to_inference(model), xs[0], fmt, dynamic=True, onnx_exporter=onnx_exporter), fmt)
    with torch.no_grad():
        return [relative_error(run(x), model(x)) for x in xs]


# torch.export is the slow one: plain and ED-SE are covered by the blocks themselves and the ED ResNet test
@pytest.mark.parametrize("block,fmt", [(b, f) for f in ("onnx", "torchscript", "export") for b in sorted(BLOCKS)
                                       if not (f == "export" and b in ("plain", "ed_se"))])
def test_export_round_trip_per_block(block, fmt, export_worker):
    """Exported at 32 px with dynamic batch/height/width, run back by its runtime at other sizes (odd ones too)."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    cfg = {**CIFAR, **BLOCKS[block]}
    errs = export_worker(round_trip_errors, cfg, fmt) if fmt == "export" else round_trip_errors(cfg, fmt)
    assert max(errs) < 1e-4, (block, fmt, errs)


def test_dynamo_onnx_exporter_round_trip_ce_ed(export_worker):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    cfg = {**CIFAR, "plugins": BLOCKS["ce"]["plugins"] + BLOCKS["ed"]["plugins"]}
    assert max(export_worker(round_trip_errors, cfg, "onnx", ((2, 32, 32), (3, 35, 40)), "dynamo")) < 1e-4


def test_ed_resnet_exported_at_64_runs_at_80_and_72x96(export_worker):
    """The deployer's case: an ED model traced at 64 px failed at 80x80 and 72x96 (layer3's add).
    torch.export specialises dims of size 1 (at 64 px stage 4's ED encoder map is 1x1): it exports at 96."""
    cfg = {"backbone": "resnet18", "num_classes": 10, **BLOCKS["ed"]}
    for fmt, side in (("onnx", 64), ("torchscript", 64), ("export", 96)):
        sizes = ((2, side, side), (2, 80, 80), (1, 72, 96))
        errs = export_worker(round_trip_errors, cfg, fmt, sizes) if fmt == "export" else round_trip_errors(cfg, fmt, sizes)
        assert max(errs) < 1e-4, (fmt, errs)


# ----------------------------------------------------------------------------- tools.deploy
CE_CONFIG = str(ROOT / "configs" / "ablation" / "ce_resnet20.yaml")
ED_CONFIG = str(ROOT / "configs" / "ablation" / "ed_resnet20.yaml")


def _checkpoint(tmp_path, config=CE_CONFIG, name="ce.pth"):
    from engine.config import load_config
    torch.manual_seed(0)
    model = trained_like(build_model(load_config(config).model))
    path = tmp_path / name
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    return str(path)


def test_deploy_cli_end_to_end(tmp_path):
    pytest.importorskip("onnxruntime")
    ckpt, out = _checkpoint(tmp_path), tmp_path / "ce_r20.onnx"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "tools.deploy", CE_CONFIG, ckpt, "--format", "onnx", "--out", str(out),
                        "--dynamic"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "inference form: 19 conv+BN folded, replaced 9 CE" in lines[0]
    assert lines[-1].startswith(f"deployed {out}: onnx") and "onnxruntime vs eager eval" in lines[-1]
    assert out.is_file() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    import onnxruntime as ort
    from engine.config import load_config
    model = build_model(load_config(CE_CONFIG).model)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    x = torch.randn(2, 3, 41, 29)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert relative_error(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), model.eval()(x)) < 1e-4


def _main(argv, capsys):
    from tools import deploy
    rc = deploy.main(argv)
    return rc, capsys.readouterr().err.strip()


def test_deploy_refusals(tmp_path, capsys, monkeypatch):
    ckpt, out = _checkpoint(tmp_path), str(tmp_path / "m.pt2")
    cases = [
        ([CE_CONFIG, str(tmp_path / "none.pth"), "--format", "export", "--out", out], "not found"),
        ([str(tmp_path / "none.yaml"), ckpt, "--format", "export", "--out", out], "does not exist"),
        ([CE_CONFIG, ckpt, "--format", "tflite", "--out", out], "unknown --format 'tflite'"),
        ([ED_CONFIG, ckpt, "--format", "export", "--out", out], "do not fit the model"),  # another architecture
        ([CE_CONFIG, ckpt, "--format", "export", "--out", str(tmp_path)], "is a directory"),
    ]
    for argv, message in cases:
        rc, err = _main(argv, capsys)
        assert rc == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as when not installed
    rc, err = _main([CE_CONFIG, ckpt, "--format", "onnx", "--out", str(tmp_path / "m.onnx")], capsys)
    assert rc == 2 and "pip install" in err and "onnxruntime" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ce.pth"]  # nothing written


def test_deploy_failed_check_writes_nothing(tmp_path, capsys, monkeypatch):
    from tools import deploy
    ckpt, out = _checkpoint(tmp_path), tmp_path / "m.pt"
    out.write_bytes(b"previous")
    from models import export
    real = export.runner
    monkeypatch.setattr(deploy, "runner", lambda data, fmt: (lambda x, run=real(data, fmt): run(x) * 1.01))
    rc, err = _main([CE_CONFIG, ckpt, "--format", "torchscript", "--out", str(out)], capsys)
    assert rc == 1 and "differ from eager eval" in err and "nothing written" in err
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["ce.pth", "m.pt"]


def test_ce_inference_traced_on_1x1_maps_runs_right_on_larger_ones():
    """CE's eval forward divides by max(H*W - 1, 1), a Python int a trace at a 1x1 map fixes to 1
    (a MobileNetV2 traced at 32 px); CEInference takes H*W - 1 from a tensor."""
    from blocks.ce import CE
    torch.manual_seed(0)
    ce = CE(32, group_channels=16)
    ce.train()(torch.randn(8, 32, 4, 4))
    ce.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(ce.deploy(), (torch.randn(2, 32, 1, 1),), check_trace=False)
        x = torch.randn(2, 32, 3, 3)
        assert relative_error(traced(x), ce(x)) < 1e-6


def test_folded_we_weights_load_strictly_into_the_plain_config():
    from models.weights import load_weights
    we = build({**CIFAR, **BLOCKS["we"]})
    inf = to_inference(we, fold_bn=False)  # WE folded only: the plain backbone's keys
    plain = build_model(CIFAR).eval()
    assert load_weights(plain, inf.state_dict()).ok
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert relative_error(plain(x), we(x)) < 1e-5


def test_relative_error_counts_a_missing_output_or_another_shape_as_infinite():
    """A runtime that returned fewer maps or a broadcastable shape ((1, C) for (2, C)) must not pass the check."""
    a, b = torch.ones(2, 3), torch.ones(1, 3)
    assert relative_error(b, a) == float("inf")
    assert relative_error([a], {"0": a, "1": a}) == float("inf")
    assert relative_error([a, a * 1.5], {"0": a, "1": a}) == 0.5  # the worst map, each on its own scale


DETECTION_BACKBONE = """
model:
  backbone: resnet18
  num_classes: 10
  conv: {type: we, lwe: true, mwe: true, ws: false}
  plugins:
    - {type: ce, position: after_norm, stages: [1, 2, 3, 4]}
    - {type: ed, position: parallel, groups: 4}
data: {dataset: synthetic, input_size: 64}
"""


def deploy_in_worker(argv):
    from tools import deploy
    return deploy.main(argv)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "export"])
def test_deploy_a_features_only_backbone(tmp_path, fmt, export_worker):
    """A detection backbone (features_only, out_indices) deploys like a classifier: every map checked.
    Before, tools.deploy ended in a traceback on the dict of maps."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    from engine.config import load_config
    config = tmp_path / "det.yaml"
    config.write_text(DETECTION_BACKBONE)
    ckpt = _checkpoint(tmp_path, str(config), "cls.pth")  # a classification checkpoint of the same backbone
    out = tmp_path / f"det.{fmt}"
    argv = [str(config), ckpt, "--format", fmt, "--out", str(out), "--dynamic", "--input-size", "96",
            "model.features_only=true", "model.out_indices=[1,2,3,4]"]
    assert (export_worker(deploy_in_worker, argv) if fmt == "export" else deploy_in_worker(argv)) == 0
    if fmt == "export":
        return  # torch.export.load here would break later forked tests (module doc); the worker's deploy checked it
    from models.export import runner
    model = build_model(load_config(str(config), ["model.features_only=true", "model.out_indices=[1,2,3,4]"]).model)
    model.load_state_dict({k: v for k, v in torch.load(ckpt, weights_only=True)["model"].items()
                           if not k.startswith("fc.")})
    run = runner(out.read_bytes(), fmt)
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        ref, got = model.eval()(x), run(x)
    assert [tuple(v.shape) for v in ref.values()] == [(1, c, -(-72 // r), -(-88 // r)) for c, r in
                                                       zip((64, 128, 256, 512), (4, 8, 16, 32))]
    assert relative_error(got, ref) < 1e-4
    if fmt == "onnx":
        import onnxruntime as ort
        names = [o.name for o in ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_outputs()]
        assert names == ["feature_0", "feature_1", "feature_2", "feature_3"]
