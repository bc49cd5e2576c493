"""ED block: float64 reference, output sizes, -A/-B widths, the ED-Net checkpoint converter."""
import pytest
import torch
import torch.nn.functional as F

from analysis.flops import complexity, ednet_count
from blocks.ed import ED, PUBLISHED_GFLOPS, a_costs, a_width
from models import build_model
from models.converters import ednet
from models.weights import load_weights

EPS, MOMENTUM = 1e-5, 0.1


# ---------------------------------------------------------------- float64 reference
def ref_bn(x, weight, bias, running_mean, running_var, training):
    """BatchNorm2d written out; returns (y, new running_mean, new running_var)."""
    if training:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        n = x.numel() // x.shape[1]
        running_mean = (1 - MOMENTUM) * running_mean + MOMENTUM * mean.detach()
        running_var = (1 - MOMENTUM) * running_var + MOMENTUM * var.detach() * n / (n - 1)
    else:
        mean, var = running_mean, running_var
    y = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + EPS) * weight[:, None, None] + bias[:, None, None]
    return y, running_mean, running_var


def ref_ed(x, p, groups, training):
    """ED path of the ED-Net repository: enc = ReLU(BN(conv3x3 s2)), dec = BN(convT3x3 s2), sized to x."""
    e = F.conv2d(x, p["enc_w"], stride=2, padding=1, groups=groups)
    e, rm1, rv1 = ref_bn(e, p["enc_g"], p["enc_b"], p["enc_rm"], p["enc_rv"], training)
    e = e.clamp_min(0)
    # transposed conv output = (n - 1) * 2 - 2 * 1 + 3 + output_padding; pick the padding that gives x's size
    pad = tuple(s - ((n - 1) * 2 - 2 + 3) for s, n in zip(x.shape[-2:], e.shape[-2:]))
    d = F.conv_transpose2d(e, p["dec_w"], stride=2, padding=1, output_padding=pad, groups=groups)
    d, rm2, rv2 = ref_bn(d, p["dec_g"], p["dec_b"], p["dec_rm"], p["dec_rv"], training)
    return d, (rm1, rv1, rm2, rv2)


def random_params(channels, hidden, groups, gen):
    def r(*shape, lo=-1.0, hi=1.0):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo)
    return {
        "enc_w": r(hidden, channels // groups, 3, 3) * 0.3, "dec_w": r(hidden, channels // groups, 3, 3) * 0.3,
        "enc_g": r(hidden, lo=0.5, hi=1.5), "enc_b": r(hidden, lo=-0.2, hi=0.2),
        "dec_g": r(channels, lo=0.5, hi=1.5), "dec_b": r(channels, lo=-0.2, hi=0.2),
        "enc_rm": r(hidden, lo=-0.1, hi=0.1), "enc_rv": r(hidden, lo=0.5, hi=1.5),
        "dec_rm": r(channels, lo=-0.1, hi=0.1), "dec_rv": r(channels, lo=0.5, hi=1.5),
    }


def load_into(module, p):
    with torch.no_grad():
        module.encoder_conv.weight.copy_(p["enc_w"])
        module.decoder_conv.weight.copy_(p["dec_w"])
        for bn, k in ((module.encoder_bn, "enc"), (module.decoder_bn, "dec")):
            bn.weight.copy_(p[k + "_g"]); bn.bias.copy_(p[k + "_b"])
            bn.running_mean.copy_(p[k + "_rm"]); bn.running_var.copy_(p[k + "_rv"])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("size", [(7, 7), (14, 15)])
def test_ed_matches_float64_reference(training, size):
    gen = torch.Generator().manual_seed(0)
    channels, reduction, groups = 64, 4, 8
    block = ED(channels, groups=groups, reduction=reduction).double().train(training)
    p = random_params(channels, channels // reduction, groups, gen)
    load_into(block, p)
    x = torch.randn(3, channels, *size, generator=gen, dtype=torch.float64)
    g_out = torch.randn(3, channels, *size, generator=gen, dtype=torch.float64)

    xr = x.clone().requires_grad_()
    leaves = {k: v.clone().requires_grad_() for k, v in p.items() if not k.endswith(("_rm", "_rv"))}
    ref, stats = ref_ed(xr, {**p, **leaves}, groups, training)
    (ref * g_out).sum().backward()

    xb = x.clone().requires_grad_()
    out = block(xb)
    (out * g_out).sum().backward()

    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xb.grad, xr.grad, rtol=1e-10, atol=1e-10)
    grads = {"enc_w": block.encoder_conv.weight, "dec_w": block.decoder_conv.weight,
             "enc_g": block.encoder_bn.weight, "enc_b": block.encoder_bn.bias,
             "dec_g": block.decoder_bn.weight, "dec_b": block.decoder_bn.bias}
    for k, param in grads.items():
        torch.testing.assert_close(param.grad, leaves[k].grad, rtol=1e-10, atol=1e-10, msg=k)
    buffers = (block.encoder_bn.running_mean, block.encoder_bn.running_var,
               block.decoder_bn.running_mean, block.decoder_bn.running_var)
    for got, want in zip(buffers, stats):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [7, 14, 15, 28, 56, 57])
def test_output_size_equals_input_size(size):
    block = ED(64, groups=8).eval()
    for shape in ((size, size), (size, size + 1)):
        x = torch.randn(1, 64, *shape)
        with torch.no_grad():
            assert block(x).shape == x.shape


def test_defaults_follow_the_original():
    block = ED(256)   # ED-ResNet stage 1: 256 -> 64 -> 256, 32 groups, no bias
    assert block.encoder_conv.weight.shape == (64, 8, 3, 3) and block.encoder_conv.bias is None
    assert block.decoder_conv.weight.shape == (64, 8, 3, 3) and block.decoder_conv.bias is None
    assert block.encoder_conv.stride == (2, 2) and block.decoder_conv.stride == (2, 2)
    assert block.encoder_conv.padding == (1, 1) and block.decoder_conv.padding == (1, 1)
    assert torch.equal(block.decoder_bn.weight, torch.ones(256))   # not zero-initialised
    assert ED(256, reduction=2).hidden == 128                      # ED-ResNeXt-32x4d


def test_channels_last_and_autocast():
    block = ED(64, groups=8).to(memory_format=torch.channels_last)
    x = torch.randn(2, 64, 15, 14).to(memory_format=torch.channels_last)
    y = block(x)
    assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.shape == x.shape and torch.isfinite(y.float()).all()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="set groups: 16"):
        ED(64, groups=32)  # 64 // 4 = 16 hidden channels cannot form 32 groups
    with pytest.raises(ValueError, match="variant"):
        ED(256, variant="C")
    with pytest.raises(ValueError, match="reduction"):
        ED(256, reduction=3)


# ---------------------------------------------------------------- -A / -B widths
RESNET_A, RESNEXT_A = [56, 120, 240, 480], [96, 224, 416, 864]


def test_branch_widths():
    resnet, resnext = (64, 128, 256, 512), (128, 256, 512, 1024)
    assert [ED.branch_width(w, s + 1) for s, w in enumerate(resnet)] == list(resnet)
    assert [ED.branch_width(w, s + 1, variant="B") for s, w in enumerate(resnet)] == [32, 64, 128, 256]
    assert [ED.branch_width(w, s + 1, variant="A") for s, w in enumerate(resnet)] == RESNET_A
    x_widths = {v: [ED.branch_width(w, s + 1, reduction=2, variant=v) for s, w in enumerate(resnext)] for v in "AB"}
    assert x_widths == {"A": RESNEXT_A, "B": [64, 128, 256, 512]}
    # ResNeXt widths stay multiples of the cardinality (= the ED groups), ResNet's of 8
    assert all(ED.branch_width(w, 1, reduction=2, variant=v) % 32 == 0 for w in resnext for v in "AB")
    assert all(w % 8 == 0 for w in RESNET_A)
    with pytest.raises(ValueError, match="reduction=8"):
        ED.branch_width(256, 1, reduction=8, variant="A")


def test_a_width_balances_the_ed_path_as_counted():
    """a_costs is the ednet count per pixel of a repeated bottleneck + ED path, and -A balances it."""
    with torch.device("meta"):
        for backbone, reduction, width in (("resnet50", 4, 64), ("resnext50_32x4d", 2, 128)):
            model = build_model({"backbone": backbone, "num_classes": 10,
                                 "plugins": [{"type": "ed", "position": "parallel", "reduction": reduction}]})
            block = model.layer1[1]                      # no downsample, all at 56x56
            x = torch.zeros(1, block.conv1.in_channels, 56, 56)
            branch, ed = a_costs(width, reduction)
            assert ednet_count(block, x) == 56 * 56 * (branch(width) + ed)
            target = a_width(width, reduction)
            assert branch(target) + ed == pytest.approx(branch(width))


@pytest.mark.parametrize("variant,widths", [("A", RESNET_A), ("B", [32, 64, 128, 256])])
def test_variants_resize_the_host_branch_only(variant, widths):
    with torch.device("meta"):
        model = build_model({"backbone": "resnet50", "num_classes": 10,
                             "plugins": [{"type": "ed", "position": "parallel", "variant": variant}]})
    for stage, width in enumerate(widths, 1):
        block = getattr(model, f"layer{stage}")[1]
        assert block.conv2.weight.shape[:2] == (width, width)
        assert block.ed.hidden == 64 * 2 ** (stage - 1)     # the ED path keeps p = C / 4


def test_readme_gflops_table():
    """Every GFLOPs figure of the ED README (baselines, -A, -B; 15 models) within 5%, in its counting.

    The README's figures are thop-style counts (convention ``ednet``: transposed convs charged per
    output pixel, BNs 4 per element); see docs/ed_variants.md. Built on the meta device (~10 s).
    """
    checked = 0
    for name, (model_cfg, size, _params, published, _source) in PUBLISHED_GFLOPS.items():
        if published is None:         # full ED: no README figure
            continue
        with torch.device("meta"):
            model = build_model(dict(model_cfg, num_classes=1000))
        _, gflops = complexity(model, size, convention="ednet")
        assert abs(gflops / published - 1) < 0.05, (name, gflops, published)
        checked += 1
    assert checked == 15


# ---------------------------------------------------------------- ED-Net checkpoints
def ednet_state_dict(layers, base, expansion, cardinality, se):
    """Keys and shapes of ``ed_resnet.py`` / ``ed_resnext.py`` / ``ed_se_*.py`` written out by hand."""
    sd = {}

    def conv(name, o, i, k):
        sd[name + ".weight"] = torch.randn(o, i, k, k)

    def bn(name, c):
        sd.update({name + ".weight": torch.rand(c) + 0.5, name + ".bias": torch.randn(c) * 0.1,
                   name + ".running_mean": torch.randn(c) * 0.1, name + ".running_var": torch.rand(c) + 0.5,
                   name + ".num_batches_tracked": torch.tensor(5)})

    conv("conv1", 64, 3, 7); bn("bn1", 64)
    inplanes = 64
    for n, blocks_n in enumerate(layers, 1):
        planes = base * 2 ** (n - 1)
        out = planes * expansion
        for i in range(blocks_n):
            b = f"layer{n}.layer{n}_block_{i}"
            conv(f"{b}.conv_conv1", planes, inplanes, 1); bn(f"{b}.bn_bn1", planes)
            conv(f"{b}.conv_conv2", planes, planes // cardinality, 3); bn(f"{b}.bn_bn2", planes)
            conv(f"{b}.conv_conv3", out, planes, 1); bn(f"{b}.bn_bn3", out)
            if se:
                sd.update({f"{b}.fc_reduction.weight": torch.randn(out // 16, out),
                           f"{b}.fc_reduction.bias": torch.randn(out // 16),
                           f"{b}.fc_extention.weight": torch.randn(out, out // 16),
                           f"{b}.fc_extention.bias": torch.randn(out)})
            if i == 0:
                conv(f"{b}.shortcut.shortcut_conv", out, inplanes, 1); bn(f"{b}.shortcut.shortcut_bn", out)
            conv(f"{b}.encoder.encoder_conv", planes, out // 32, 3); bn(f"{b}.encoder.encoder_bn", planes)
            sd[f"{b}.decoder.decoder_conv.weight"] = torch.randn(planes, out // 32, 3, 3)  # ConvTranspose2d
            bn(f"{b}.decoder.decoder_bn", out)
            inplanes = out
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, inplanes), torch.randn(1000)
    return sd


CASES = {  # arch name in imagenet_train.py: (our config, ED-Net constructor arguments)
    "ED50": ("resnet50", 4, dict(base=64, expansion=4, cardinality=1, se=False)),
    "EDSE50": ("resnet50", 4, dict(base=64, expansion=4, cardinality=1, se=True)),
    "EDX50": ("resnext50_32x4d", 2, dict(base=128, expansion=2, cardinality=32, se=False)),
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_ednet_checkpoint_loads_completely(arch):
    backbone, reduction, kw = CASES[arch]
    torch.manual_seed(0)
    theirs = ednet_state_dict((3, 4, 6, 3), **kw)
    # imagenet_train.py: save_checkpoint({'epoch', 'arch', 'state_dict': DataParallel(model).state_dict(), ...})
    checkpoint = {"epoch": 100, "arch": arch, "best_prec1": 76.9, "optimizer": {"state": {}, "param_groups": []},
                  "state_dict": {"module." + k: v for k, v in theirs.items()}}
    assert ednet.detect(checkpoint["state_dict"])
    plugins = ([{"type": "se"}] if kw["se"] else []) + [{"type": "ed", "position": "parallel",
                                                          "reduction": reduction}]
    model = build_model({"backbone": backbone, "num_classes": 1000, "plugins": plugins})
    report = load_weights(model, checkpoint)
    assert report.source == "ednet" and report.ok, report.summary()
    assert report.loaded == len(model.state_dict()) == len(theirs)
    ours = model.state_dict()
    pairs = {"layer2.layer2_block_0.shortcut.shortcut_conv.weight": "layer2.0.downsample.0.weight",
             "layer3.layer3_block_5.bn_bn3.running_var": "layer3.5.bn3.running_var",
             "layer4.layer4_block_2.encoder.encoder_bn.bias": "layer4.2.ed.encoder_bn.bias",
             "layer1.layer1_block_1.decoder.decoder_conv.weight": "layer1.1.ed.decoder_conv.weight"}
    if kw["se"]:
        pairs["layer1.layer1_block_0.fc_extention.weight"] = "layer1.0.se.fc2.weight"
    for theirs_key, our_key in pairs.items():
        assert torch.equal(ours[our_key].flatten(), theirs[theirs_key].flatten()), our_key


def test_detect_ignores_torchvision_keys():
    assert not ednet.detect({"layer1.0.conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)})
