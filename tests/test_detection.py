"""Backbones for dense prediction: feature_info, features-only models, torch.fx, torchvision detection."""
import glob
import inspect
import itertools
import pathlib

import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.feature_extraction import create_feature_extractor

from blocks.ce import CE
from core.config import read_tree
from core.fields import ConfigError
from models import BACKBONES, build_model, get_conv, validate_model_cfg
from models.features import FPNBackbone
from models.plugins import parse_plugins
from models.weights import WeightsMismatchError, load_weights

ROOT = pathlib.Path(__file__).resolve().parents[1]
R50 = {"ce": "configs/imagenet/cenet/ce_resnet50.yaml", "ed": "configs/imagenet/ednet/ed_resnet50.yaml",
       "we": "configs/imagenet/we/we_resnet50.yaml", "se": "configs/imagenet/ednet/se_resnet50.yaml"}


def model_section(path):
    return read_tree(str(ROOT / path)).get("model", {})


# ---------------------------------------------------------------------------------------------- feature_info

def test_feature_info_is_what_the_readme_documents():
    info = build_model({"backbone": "resnet50"}).feature_info
    assert [(e["module"], e["num_chs"], e["reduction"]) for e in info] == [
        ("relu", 64, 2), ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16), ("layer4", 2048, 32)]
    assert build_model({"backbone": "resnet18"}).feature_info.channels() == [64, 64, 128, 256, 512]
    mbv2 = build_model({"backbone": "mobilenet_v2"}).feature_info  # timm's mobilenetv2_100 numbering
    assert mbv2.module_name() == ["features.1", "features.3", "features.6", "features.13", "features.17"]
    assert mbv2.channels() == [16, 24, 32, 96, 320] and mbv2.reduction() == [2, 4, 8, 16, 32]
    cifar = build_model({"backbone": "cifar_resnet20", "num_classes": 10}).feature_info
    assert cifar.channels() == [16, 16, 32, 64] and cifar.reduction() == [1, 1, 2, 4]
    sel = build_model({"backbone": "resnet50"}, features_only=True, out_indices=[1, 2, 3, 4]).feature_info
    assert sel.channels() == [256, 512, 1024, 2048] and sel.reduction() == [4, 8, 16, 32]
    assert sel.return_nodes() == {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}


# Every backbone with every block the configs use (ED -A/-B change the bottleneck's inner width only; ED
# with 4 groups is the CIFAR ED), plus the model section of every config file that builds a model not in
# this matrix.
BLOCKS = {"plain": {}, "ce": {"plugins": [{"type": "ce", "stem": True}]}, "se": {"plugins": [{"type": "se"}]},
          "we": {"conv": {"type": "we"}}, "ed": {"plugins": [{"type": "ed", "position": "parallel"}]},
          "ed_a": {"plugins": [{"type": "ed", "position": "parallel", "variant": "A"}]},
          "ed_b": {"plugins": [{"type": "ed", "position": "parallel", "variant": "B"}]},
          "se+ed": {"plugins": [{"type": "se"}, {"type": "ed", "position": "parallel"}]}}
CIFAR_ED = {"plugins": [{"type": "ed", "position": "parallel", "groups": 4}]}
SHAPE_CASES = {f"{b}-{k}": dict({"backbone": b, "num_classes": 10}, **v)
               for b, (k, v) in itertools.product(sorted(BACKBONES), BLOCKS.items())}
SHAPE_CASES.update({f"{b}-ed_g4": dict({"backbone": b, "num_classes": 10}, **CIFAR_ED) for b in BACKBONES
                    if b.startswith("cifar")})

def _defaults(cls, options, skip):
    params = list(inspect.signature(cls.__init__).parameters.values())[skip:]
    return tuple(sorted({**{p.name: p.default for p in params if p.default is not p.empty}, **options}.items()))


def model_key(cfg):
    """What decides a model's structure: options at their defaults and init-only arguments left out."""
    conv = dict(cfg.get("conv") or {"type": "plain"})
    conv_type = conv.pop("type", "plain")
    conv.pop("exclude", None)
    plugins = tuple((s.type, s.position, s.stages, s.stem, _defaults(s.cls, s.options, 2))
                    for s in parse_plugins(cfg.get("plugins") or []))
    args = {k: v for k, v in (cfg.get("backbone_args") or {}).items() if not k.startswith("zero_init")}
    return (cfg["backbone"], conv_type, _defaults(get_conv(conv_type), conv, 6), plugins,
            tuple(sorted(args.items())), tuple((cfg.get("conv") or {}).get("exclude", ())))


_KEYS = {model_key(c) for c in SHAPE_CASES.values()}
for _path in sorted(glob.glob("configs/**/*.yaml", root_dir=ROOT, recursive=True)):
    _model = model_section(_path)
    if "_base_" not in _path and "backbone" in _model and model_key(_model) not in _KEYS:
        SHAPE_CASES[_path], _ = _model, _KEYS.add(model_key(_model))


def test_the_shape_matrix_covers_every_backbone_and_block():
    assert {c["backbone"] for c in SHAPE_CASES.values()} == set(BACKBONES)
    assert "configs/imagenet/ednet/ed_resnext50.yaml" in SHAPE_CASES  # ED with reduction 2: not in the matrix
    assert not any(k.startswith("configs/imagenet/we/") for k in SHAPE_CASES
                   if "werepo" not in k and "we_se" not in k)  # = matrix (WE+SE and LWE-only: combinations)


def refused(case):
    """The combinations the loader refuses: ED on a backbone without a residual bottleneck (MobileNetV2,
    ShuffleNetV2), and ED -A/-B, which only change a bottleneck's inner width, on basic-block ResNets."""
    backbone, _, blocks = case.partition("-")
    if backbone.startswith(("mobilenet", "shufflenet")):
        return "ed" in blocks
    basic = backbone.startswith("cifar") or backbone in ("resnet18", "resnet34")
    return basic and blocks in ("ed_a", "ed_b")


def test_the_refused_shape_cases_are_the_ones_we_expect():
    assert refused("mobilenet_v2-se+ed") and refused("cifar_resnet20-ed_a") and refused("resnet34-ed_b")
    assert not refused("resnet50-ed_a") and not refused("cifar_resnet20-ed_g4") and not refused("mobilenet_v2-se")
    assert not any(refused(c) for c in SHAPE_CASES if c.startswith("configs/"))
    assert 0 < sum(map(refused, SHAPE_CASES)) < len(SHAPE_CASES) / 4


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_features_have_the_documented_shapes(case):
    """A combination the config loader refuses fails to build too; every other one has the documented maps."""
    cfg = SHAPE_CASES[case]
    torch.manual_seed(0)
    if refused(case):
        with pytest.raises(ConfigError):
            validate_model_cfg(cfg)
        with pytest.raises((ConfigError, ValueError)):
            build_model(cfg, features_only=True)
        return
    model = build_model(cfg, features_only=True).eval()
    side = 45  # odd: the map side is ceil(side / reduction) at every stride
    with torch.no_grad():
        out = model(torch.randn(1, 3, side, side))
    info = model.feature_info
    assert list(out) == [str(k) for k in range(len(info))]
    assert [tuple(v.shape) for v in out.values()] == [
        (1, c, -(-side // r), -(-side // r)) for c, r in zip(info.channels(), info.reduction())]
    assert all(torch.isfinite(v).all() for v in out.values())
    assert not any(n.startswith(("fc.", "classifier.")) for n, _ in model.named_parameters())


# ------------------------------------------------------------------------------------- features-only models

@pytest.mark.parametrize("cfg,message", [
    ({"features_only": True, "out_indices": [1, 5]}, "model.out_indices [5] out of range; resnet50 has features 0..4"),
    ({"features_only": True, "out_indices": [1, 1, 2]}, "lists a feature twice"),
    ({"features_only": True, "out_indices": [3, 1]}, "must increase"),
    ({"features_only": True, "out_indices": []}, "must be a non-empty list of feature indices"),
    ({"out_indices": [1, 2]}, "set model.features_only: true or remove out_indices"),
    ({"features_only": "yes"}, "model.features_only='yes' must be true or false"),
])
def test_bad_out_indices_are_refused_with_one_sentence(cfg, message):
    with pytest.raises(ConfigError) as err:
        validate_model_cfg(dict({"backbone": "resnet50"}, **cfg))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_plugin_only_on_dropped_stages_is_refused_not_dropped():
    """A block the features-only model would lose entirely is a config mistake; one lost only in part is not."""
    cfg = {"backbone": "resnet50", "features_only": True, "out_indices": [1, 2],
           "plugins": [{"type": "se"}, {"type": "ce", "stem": True, "stages": [1]}, {"type": "ce", "stages": [3, 4]}]}
    with pytest.raises(ConfigError) as err:
        validate_model_cfg(cfg)
    assert str(err.value).startswith("model.plugins.2 (ce) sits only on stages [3, 4], which out_indices=[1, 2] "
                                     "drops") and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"plugins.2 \(ce\)"):
        build_model(cfg)
    cfg["plugins"][2]["stages"] = [2, 3]  # its stage-2 copies remain
    model = build_model(cfg)
    assert sum(isinstance(m, CE) for m in model.modules()) == 1 + 3 + 4  # stem, layer1 (3 blocks), layer2 (4)
    build_model(dict(cfg, out_indices=[1, 2, 3, 4]))
    with pytest.raises(ConfigError, match=r"plugins.0 \(se\) sits only on stages \[7\]"):
        validate_model_cfg({"backbone": "mobilenet_v2", "features_only": True, "out_indices": [1, 2],
                            "plugins": [{"type": "se", "stages": [7]}]})


def test_cifar_and_mobilenet_ranges_are_their_own():
    validate_model_cfg({"backbone": "cifar_resnet20", "num_classes": 10, "features_only": True, "out_indices": [3]})
    with pytest.raises(ConfigError, match=r"\[4\] out of range; cifar_resnet20 has features 0..3"):
        validate_model_cfg({"backbone": "cifar_resnet20", "num_classes": 10, "features_only": True,
                            "out_indices": [4]})


def test_a_classification_checkpoint_loads_into_a_features_model_with_the_head_reported_unused():
    torch.manual_seed(0)
    cfg = {"backbone": "resnet18", "num_classes": 7, "plugins": [{"type": "ce", "stages": [1, 2], "stem": True}]}
    full = build_model(cfg).eval()
    feats = build_model(cfg, features_only=True, out_indices=[1, 2])
    assert not hasattr(feats, "fc") and not hasattr(feats, "layer3") and not hasattr(feats, "layer4")
    report = load_weights(feats.eval(), full.state_dict())  # strict
    assert report.ok and report.loaded == len(feats.state_dict())
    assert {k.split(".")[0] for k in report.unused} == {"layer3", "layer4", "fc"}
    assert "unused by the features-only model" in report.summary()
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        ref, got = full.forward_stages(x, [1, 2]), feats(x)
    assert all(torch.equal(ref[k], got[k]) for k in ("0", "1"))
    tv = load_weights(build_model({"backbone": "resnet18"}, features_only=True), torchvision.models.resnet18().state_dict())
    assert tv.ok and tv.unused == ["fc.weight", "fc.bias"]
    bad = {k: v for k, v in full.state_dict().items() if k != "layer2.0.conv1.weight"}
    with pytest.raises(WeightsMismatchError, match="layer2.0.conv1.weight"):  # what the maps need stays strict
        load_weights(feats, bad)


def test_build_model_keywords_override_the_config_section():
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(build_model({"backbone": "resnet18", "features_only": True}, features_only=False)(x), torch.Tensor)
    model = build_model({"backbone": "resnet18"}, out_indices=[2])  # out_indices alone implies features_only
    assert list(model(x)) == ["0"] and model.feature_info.channels() == [128]
    with pytest.raises(ValueError, match="keeps maps up to 2 only"):
        model.forward_stages(x, [3])


def test_classification_forward_is_unchanged_by_the_features_code():
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet50", "num_classes": 5, "plugins": [{"type": "ce", "stem": True}]}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_stages(x, [4])["0"]
        assert torch.equal(model(x), model.fc(model.avgpool(feats).flatten(1)))


# ------------------------------------------------------------------------------------------------- torch.fx

FX_CASES = dict(R50, ce_mbv2="configs/imagenet/mobilenet/ce_mobilenet_v2.yaml")


@pytest.mark.parametrize("name", sorted(FX_CASES))
def test_create_feature_extractor_and_symbolic_trace_equal_eager(name):
    torch.manual_seed(0)
    model = build_model(dict(model_section(FX_CASES[name]), num_classes=10)).double()
    idx = [1, 2, 3, 4]
    extractor = create_feature_extractor(model, return_nodes=model.feature_info.return_nodes(idx))
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for train in (True, False):  # train: batch statistics; eval: running ones (shared, so equal inputs)
        for m in (model, extractor, traced):
            m.train(train)
        with torch.no_grad():
            ref, got = model.forward_stages(x, idx), extractor(x)
            assert list(got) == ["0", "1", "2", "3"]
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-12)
            logits = [(torch.manual_seed(1), m(x))[1] for m in (traced, model)]  # same dropout draws
            torch.testing.assert_close(*logits, rtol=0, atol=1e-12)


def test_traced_models_branch_at_call_time():
    """CE's memory-format choice and WE's eval cache happen when the traced graph runs, not when tracing."""
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet18", "num_classes": 4, "conv": {"type": "we"},
                         "plugins": [{"type": "ce", "stem": True}]}).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
        assert model.layer1[0].conv1._cache is not None  # the traced call filled the cache
        xc = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(traced(xc), model(xc), rtol=0, atol=0)


# ------------------------------------------------------------------------------ torchvision Faster R-CNN + FPN

def test_torchvision_backbone_with_fpn_takes_our_resnets_too():
    """torchvision's IntermediateLayerGetter runs a ResNet's children in order: ours are registered in the
    order forward runs them (stem plug-ins between bn1 and relu), so it gets the same maps as our forward."""
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet18", "plugins": [{"type": "ce", "stem": True}, {"type": "se"}]}).eval()
    info, idx = model.feature_info, [1, 2, 3, 4]
    tv = BackboneWithFPN(model, {m: str(k) for k, m in enumerate(info.module_name(idx))}, info.channels(idx), 32).eval()
    ours = FPNBackbone(build_model({"backbone": "resnet18", "plugins": [{"type": "ce", "stem": True}, {"type": "se"}]},
                                   features_only=True, out_indices=idx), 32).eval()
    load_weights(ours, tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, got = tv(x), ours(x)
    assert list(got) == list(ref) == ["0", "1", "2", "3", "pool"]
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    with pytest.raises(ValueError, match="needs a features-only model"):
        FPNBackbone(model)


BLOCK_PARAM = {"ce": "layer2.0.ce.theta", "ed": "layer2.0.ed.encoder_conv.weight",
               "we": "layer2.0.conv2.lwe.fc1.weight", "se": "layer2.0.se.fc1.weight"}


@pytest.mark.parametrize("block", sorted(R50))
def test_faster_rcnn_with_fpn_trains_and_infers_on_our_backbones(block):
    torch.manual_seed(0)
    body = build_model(model_section(R50[block]), features_only=True, out_indices=[1, 2, 3, 4])
    # torchvision's trainable_layers=3 (stem and layer1 frozen; the stem's plug-ins are part of the stem)
    for name in ["conv1", "bn1", *body.stem_plugins, "layer1"]:
        body.get_submodule(name).requires_grad_(False)
    detector = FasterRCNN(FPNBackbone(body), num_classes=3, min_size=128, max_size=160)
    images = [torch.rand(3, 128, 160), torch.rand(3, 128, 160)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 30.0, 150.0, 120.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[5.0, 5.0, 100.0, 100.0]]), "labels": torch.tensor([2])}]
    params = dict(detector.backbone.body.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    detector.train()
    losses = detector(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    block_param = params[BLOCK_PARAM[block]]
    assert block_param.grad is not None and block_param.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(block_param, before[BLOCK_PARAM[block]])
    assert not torch.equal(params["layer4.2.conv3.weight"], before["layer4.2.conv3.weight"])
    frozen = [k for k in params if k.startswith(("conv1.", "bn1.", "layer1.", "stem_"))]
    assert frozen and all(torch.equal(params[k], before[k]) for k in frozen)

    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == 2
    for d in detections:
        n = len(d["scores"])
        assert d["boxes"].shape == (n, 4) and d["labels"].shape == (n,) and torch.isfinite(d["boxes"]).all()


def test_the_classification_trainer_refuses_a_features_only_model(tmp_path):
    from engine.config import load_config
    from engine.trainer import Trainer
    cfg = load_config(str(ROOT / "configs/default.yaml"),
                      ["model.features_only=true", "model.out_indices=[1,2]", f"runtime.work_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="set model.features_only=false"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_test_sh_refuses_a_features_only_model(tmp_path, capsys):
    # ./test.sh used to end in a traceback ('OrderedDict' object has no attribute 'float')
    from tools import test as test_tool
    out = tmp_path / "result.json"
    rc = test_tool.run([str(ROOT / "configs/default.yaml"), "ce_cifar_resnet20_digits", "model.features_only=true",
                        "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "set model.features_only=false" in err[0], err
    assert not out.exists()


def test_the_documented_detection_example_runs():
    import re
    section = (ROOT / "docs" / "dense_prediction.md").read_text().split("## Faster R-CNN", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    torch.manual_seed(0)
    exec(code, scope)
    assert all(torch.isfinite(v) for v in scope["losses"].values()) and len(scope["detections"]) == 2


def test_inference_form_traces_op_by_op():
    # docs/dense_prediction.md points fx passes that must see inside CE and WE to the inference form
    from models.inference import to_inference
    cfg = {"backbone": "resnet18", "num_classes": 10, "conv": {"type": "we"},
           "plugins": [{"type": "ce", "stages": [1, 2, 3], "stem": True}]}
    model = build_model(cfg).double().eval()
    graph = torch.fx.symbolic_trace(to_inference(model))
    opaque = [n.target.__name__ for n in graph.graph.nodes if n.op == "call_function"
              and getattr(n.target, "__name__", "") in ("_ce_forward", "_we_forward")]
    assert not opaque
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    torch.testing.assert_close(graph(x), model(x), rtol=1e-10, atol=1e-10)


def test_features_in_channels_last_under_bf16_autocast():
    # detection code runs backbones in channels_last, often under bf16 autocast: the maps must match NCHW's
    # (fp32: to float rounding; bf16: to its precision, which batch statistics of 2 images amplify with depth)
    cfg = {"backbone": "resnet18", "conv": {"type": "we"},
           "plugins": [{"type": "ce", "stages": [1, 2, 3], "stem": True}, {"type": "ed", "groups": 8}]}
    torch.manual_seed(0)
    model = build_model(cfg, features_only=True, out_indices=[1, 2, 3, 4])
    x = torch.randn(2, 3, 64, 80)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        with torch.no_grad():
            ref = model(x)
            model.to(memory_format=torch.channels_last)
            xl = x.contiguous(memory_format=torch.channels_last)
            out32 = model(xl)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out16 = model(xl)
            model.to(memory_format=torch.contiguous_format)
        assert list(out32) == list(out16) == list(ref) == ["0", "1", "2", "3"]
        for k in ref:
            assert out32[k].is_contiguous(memory_format=torch.channels_last) and torch.isfinite(out16[k]).all()
            assert float((out32[k] - ref[k]).norm() / ref[k].norm()) < 1e-4, (mode, k)
            assert float((out16[k].float() - ref[k]).norm() / ref[k].norm()) < 0.15, (mode, k)
