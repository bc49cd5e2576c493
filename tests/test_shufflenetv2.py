"""ShuffleNetV2: torchvision's names, parameters, FLOPs and outputs; plug-in places; features; conv factory."""
import pytest
import torch
import torchvision

from analysis.flops import complexity
from core.fields import ConfigError
from models import build_model, validate_model_cfg
from models.shufflenetv2 import WIDTHS

# torchvision's ShuffleNet_V2_X*_Weights.IMAGENET1K_V1 meta: num_params, _ops (GFLOPs = MACs at 224)
TORCHVISION = {"x0_5": (1366792, 0.04), "x1_0": (2278604, 0.145), "x1_5": (3503624, 0.296), "x2_0": (7393996, 0.583)}


@pytest.mark.parametrize("width", sorted(TORCHVISION))
def test_params_and_flops_equal_torchvision(width):
    with torch.device("meta"):
        ours = build_model({"backbone": f"shufflenet_v2_{width}"})
        theirs = getattr(torchvision.models, f"shufflenet_v2_{width}")()
    params, gmacs = complexity(ours, 224)
    assert (params, gmacs) == complexity(theirs, 224)
    assert params == TORCHVISION[width][0] and gmacs == pytest.approx(TORCHVISION[width][1], abs=0.0005)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in theirs.state_dict().items()]


def test_torchvision_state_dict_loads_and_gives_equal_logits():
    torch.manual_seed(0)
    theirs = torchvision.models.shufflenet_v2_x1_0().eval()
    ours = build_model({"backbone": "shufflenet_v2_x1_0"}).eval()
    ours.load_state_dict(theirs.state_dict())   # strict: every key and shape
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


def test_ce_and_se_sit_after_the_last_norm_of_the_main_branch():
    model = build_model({"backbone": "shufflenet_v2_x0_5", "num_classes": 10, "plugins": [
        {"type": "ce", "position": "after_norm", "stem": True, "group_channels": 8, "stem_group_channels": 24},
        {"type": "se", "position": "after_norm", "stages": [3], "reduction": 4}]})
    units = [u for s in (model.stage2, model.stage3, model.stage4) for u in s]
    assert all(u.after_norm[0] == "ce" for u in units) and model.conv1.plugins == ["stem_ce"]
    assert [u.after_norm for u in model.stage4] == [["ce", "se"]] * 4 and model.stage3[0].after_norm == ["ce"]
    assert model.stage2[0].ce.channels == WIDTHS["shufflenet_v2_x0_5"][1] // 2   # one branch's channels
    seen = []   # the plug-in gets branch2's last BN output (before its ReLU), not the shuffled unit output
    unit = model.stage3[1]
    unit.branch2[6].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    unit.ce.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().clone()))
    model.eval()(torch.randn(2, 3, 64, 64))
    assert torch.equal(seen[0], seen[1]) and (seen[0] < 0).any()


def test_ed_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^model\.plugins\.0: block 'ed' needs a 'parallel' place, which "
                                          r"backbone 'shufflenet_v2_x1_0' does not offer") as e:
        validate_model_cfg({"backbone": "shufflenet_v2_x1_0", "plugins": [{"type": "ed"}]})
    assert "\n" not in str(e.value)


def test_we_conv_factory_reaches_every_conv():
    from blocks.we import WEConv2d
    model = build_model({"backbone": "shufflenet_v2_x0_5", "num_classes": 10, "conv": {"type": "we"}})
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(isinstance(m, WEConv2d) for m in convs)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    plain = build_model({"backbone": "shufflenet_v2_x0_5", "num_classes": 10,
                         "conv": {"type": "we", "exclude": ["depthwise", "stem", "head"]}})
    assert not isinstance(plain.conv1[0], WEConv2d) and not isinstance(plain.stage2[0].branch2[3], WEConv2d)
    assert isinstance(plain.stage2[0].branch2[0], WEConv2d)


def test_features_only_and_feature_extractor_agree():
    from torchvision.models.feature_extraction import create_feature_extractor
    torch.manual_seed(0)
    full = build_model({"backbone": "shufflenet_v2_x1_0"}).eval()
    feats = build_model({"backbone": "shufflenet_v2_x1_0"}, out_indices=[0, 1, 2, 3]).eval()
    feats.load_state_dict(full.state_dict(), strict=False)
    assert feats.feature_info.channels() == [24, 116, 232, 464] and feats.feature_info.reduction() == [2, 8, 16, 32]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = feats(x)
        ref = create_feature_extractor(full, full.feature_info.return_nodes())(x)
    assert [v.shape[-1] for v in out.values()] == [32, 8, 4, 2]
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    assert not hasattr(feats, "conv5") and not hasattr(feats, "fc")


def test_frozen_stages_count_from_the_first_shuffle_stage():
    model = build_model({"backbone": "shufflenet_v2_x0_5", "frozen_stages": 2}).train()
    assert not model.conv1.training and not model.stage3.training and model.stage4.training
    assert not model.stage3[0].branch2[0].weight.requires_grad and model.stage4[0].branch2[0].weight.requires_grad
    with pytest.raises(ConfigError, match="out of range for shufflenet_v2_x0_5: .* or 1..3"):
        validate_model_cfg({"backbone": "shufflenet_v2_x0_5", "frozen_stages": 4})
