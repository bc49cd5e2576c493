"""Issue 19.4: block options are never silently reinterpreted; refusals name the fix (docs/blocks.md)."""
import logging

import pytest

from core.fields import ConfigError
from engine.config import load_config
from models import build_model, validate_model_cfg

SMALL = """model: {backbone: cifar_resnet20, num_classes: 4}
data: {dataset: synthetic, input_size: 16, workers: 0, synthetic: {train_size: 16, val_size: 8, num_classes: 4}}
"""


def refusal(plugins, backbone="cifar_resnet20", **model):
    with pytest.raises(ConfigError) as info:
        validate_model_cfg(dict({"backbone": backbone, "num_classes": 4, "plugins": plugins}, **model))
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture
def adjustments(monkeypatch):
    """The messages blocks.registry.log_adjustment emits during the test (its once-only memory reset)."""
    from blocks import registry
    monkeypatch.setattr(registry, "_adjusted", set())
    said, log, handler = [], logging.getLogger("blocklab.blocks"), logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield said
    log.removeHandler(handler)
    log.setLevel(level)


def test_ce_group_size_that_does_not_divide_is_halved_and_logged(adjustments):
    """CENet's rule (halve G until it divides C) is kept, and the value used is said once."""
    cfg = {"backbone": "mobilenet_v2", "num_classes": 4, "plugins": [{"type": "ce", "stages": [2],
                                                                      "group_channels": 16}]}
    model = build_model(cfg)
    assert model.features[2].ce.group_channels == 8  # MobileNetV2 stage 2: 24 channels
    build_model(cfg)
    said = [m for m in adjustments if "group_channels=16 does not divide 24" in m]
    assert len(said) == 1 and "using 8" in said[0]


def test_an_adjustment_seen_before_the_console_shows_info_is_said_later(adjustments):
    """The config check builds the model before engine.logger sets up the console: the run's build still says it."""
    cfg = {"backbone": "cifar_resnet20", "num_classes": 4, "plugins": [{"type": "ce", "group_channels": 24}]}
    logging.getLogger("blocklab.blocks").setLevel(logging.WARNING)
    validate_model_cfg(cfg)
    logging.getLogger("blocklab.blocks").setLevel(logging.INFO)
    build_model(cfg)
    assert [m for m in adjustments if "group_channels=24 does not divide 16 " in m] == [
        "ce: group_channels=24 does not divide 16 channels; using 1 there (halved until it divides, as CENet does)"]


def test_ed_default_groups_work_on_cifar_resnets_and_are_logged(adjustments):
    model = build_model({"backbone": "cifar_resnet32", "num_classes": 4, "plugins": [{"type": "ed"}]})
    assert [getattr(model, f"layer{s}")[0].ed.groups for s in (1, 2, 3)] == [4, 8, 16]
    assert any("using groups=4" in m for m in adjustments)
    assert build_model({"backbone": "resnet50", "plugins": [{"type": "ed"}]}).layer1[0].ed.groups == 32


def test_ed_groups_that_do_not_divide_name_the_value_to_use():
    assert "set groups: 4" in refusal([{"type": "ed", "groups": 8}])


@pytest.mark.parametrize("backbone", ["cifar_resnet20", "resnet18"])
@pytest.mark.parametrize("variant", ["A", "B"])
def test_ed_variants_are_refused_on_basic_blocks(backbone, variant):
    """-A and -B were the same model on basic blocks; they are defined for bottleneck hosts only."""
    message = refusal([{"type": "ed", "variant": variant}], backbone)
    assert f"ed variant {variant} is defined for bottleneck hosts" in message and "remove 'variant'" in message


def test_the_same_block_twice_at_one_place_is_refused():
    assert "model.plugins.1 repeats block 'se' of model.plugins.0 at stage 2" in refusal(
        [{"type": "se", "stages": [1, 2]}, {"type": "se", "stages": [2, 3], "reduction": 4}])
    assert "at the stem" in refusal([{"type": "ce", "stem": True, "stages": [1]},
                                     {"type": "ce", "stem": True, "stages": [2]}])
    model = build_model({"backbone": "cifar_resnet20", "num_classes": 4, "plugins": [
        {"type": "se", "stages": [1]}, {"type": "se", "stages": [2, 3], "reduction": 4}]})
    assert model.layer1[0].se.fc1.out_channels == 1 and model.layer3[0].se.fc1.out_channels == 16


def test_stem_and_stages_that_would_be_misread_are_refused():
    assert "model.plugins.0.stem='no' must be true or false" in refusal([{"type": "ce", "stem": "no"}])
    assert "placed nowhere" in refusal([{"type": "se", "stages": []}])


def test_a_conv_type_in_plugins_and_a_block_in_conv_name_the_fix():
    assert "'we' is a conv type, not a plug-in block" in refusal([{"type": "we"}])
    assert "set model.conv: {type: we}" in refusal([{"type": "we"}])
    assert "add {type: ce} to model.plugins" in refusal([], conv={"type": "ce"})


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_yaml_key_without_the_space_after_its_colon_gets_the_hint(tmp_path, where):
    path = tmp_path / "c.yaml"
    if where == "file":
        path.write_text(SMALL.replace("backbone: cifar_resnet20", "backbone:cifar_resnet20"))
        overrides = []
    else:
        path.write_text(SMALL)
        overrides = ["model.plugins=[{type:ce}]"]
    with pytest.raises(ConfigError) as info:
        load_config(str(path), overrides)
    word = "backbone:cifar_resnet20" if where == "file" else "type:ce"
    fixed = word.replace(":", ": ")
    assert f"write '{fixed}' (YAML needs a space after the colon)" in str(info.value)


@pytest.mark.parametrize("conv, switch", [({"lwe": False, "reduction": 8}, "lwe"), ({"mwe_margin": 0.2}, "mwe"),
                                          ({"ws_eps": 1e-3}, "ws")])
def test_a_we_option_whose_step_is_off_is_refused(conv, switch):
    """WE's reduction / mwe_margin / ws_eps act only with lwe / mwe / ws on; set while it is off they were ignored."""
    conv = dict({"type": "we", "mwe": False}, **conv)
    message = refusal([], conv=conv)
    assert f"only with {switch}: true" in message and "would be ignored" in message
