"""Config loading: _base_ inheritance, overrides, defaults, and every kind of refused config."""
import os
import subprocess
import sys
import textwrap

import pytest

from core.config import Config, dump, load as load_with, merge, parse_override, read_tree
from core.fields import ConfigError, Field
from engine.config import load_config
from engine.schema import ENGINE_SCHEMA, cross_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small schema of the same shape as the real one (sections of Fields, a free dict, a list of dicts).
SCHEMA = {
    "model": {
        "backbone": Field("resnet50", "backbone"),
        "num_classes": Field(1000, "classes"),
        "backbone_args": Field({}, "free-form backbone arguments"),
        "plugins": Field([], "plug-in list"),
    },
    **ENGINE_SCHEMA,
}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def load(path, overrides=()):
    return load_with(path, SCHEMA, overrides, checks=(cross_check,))


@pytest.fixture
def chain(tmp_path):
    write(tmp_path, "_base_/sched.yaml", """
        train: {epochs: 100, lr: 0.1, milestones: [30, 60, 90], schedule: multistep}
    """)
    write(tmp_path, "_base_/model.yaml", """
        model:
          backbone: resnet50
          backbone_args: {zero_init_residual: true, width: 64}
          plugins: [{type: ce, stages: [1, 2, 3], stem: true}]
        train: {lr: 0.2, weight_decay: 1e-4}
    """)
    return write(tmp_path, "exp/ce.yaml", """
        _base_: [../_base_/sched.yaml, ../_base_/model.yaml]
        model:
          num_classes: 10
          backbone_args: {width: 32}
        train: {milestones: [10]}
    """)


# ----------------------------------------------------------------------------- inheritance

def test_base_chain_deep_merges_in_order(chain):
    cfg = load(chain)
    assert cfg.model.backbone == "resnet50" and cfg.model.num_classes == 10
    assert cfg.model.backbone_args == {"zero_init_residual": True, "width": 32}  # dicts merge key by key
    assert cfg.train.milestones == [10]                    # lists are replaced, not merged
    assert cfg.train.lr == 0.2                             # later base wins
    assert cfg.train.epochs == 100 and cfg.train.schedule == "multistep"
    assert cfg.train.weight_decay == 1e-4 and isinstance(cfg.train.weight_decay, float)  # 1e-4 is a float
    assert cfg.train.momentum == 0.9 and cfg.runtime.seed == 0   # schema defaults fill the rest
    assert cfg.model.plugins[0].stages == [1, 2, 3]        # attribute access inside lists


def test_nested_bases_and_delete(tmp_path):
    write(tmp_path, "a.yaml", "model: {backbone_args: {x: 1, y: 2}}\ntrain: {epochs: 5}\n")
    write(tmp_path, "sub/b.yaml", "_base_: ../a.yaml\ntrain: {lr: 0.5}\n")
    c = write(tmp_path, "sub/deeper/c.yaml", "_base_: [../b.yaml]\nmodel: {backbone_args: {_delete_: true, z: 3}}\n")
    cfg = load(c)
    assert cfg.train.epochs == 5 and cfg.train.lr == 0.5
    assert cfg.model.backbone_args == {"z": 3}


def test_merge_does_not_mutate():
    a = {"x": {"y": [1]}}
    b = {"x": {"z": 2}}
    out = merge(a, b)
    assert out == {"x": {"y": [1], "z": 2}} and a == {"x": {"y": [1]}}


# ----------------------------------------------------------------------------- overrides

def test_overrides_typed_nested_and_indexed(chain):
    cfg = load(chain, ["train.lr=0.05", "train.nesterov=true", "train.milestones=[3, 6]",
                       "model.plugins.0.stages=[1,2]", "model.plugins.0.group_channels=8",
                       "model.backbone_args.width_mult=0.5", "runtime.work_dir=/tmp/x y",
                       "train.clip_grad_norm=null", "train.epochs=7", "train.clip_grad_norm=1e1"])
    assert cfg.train.lr == 0.05 and cfg.train.nesterov is True and cfg.train.milestones == [3, 6]
    assert cfg.model.plugins[0].stages == [1, 2] and cfg.model.plugins[0].group_channels == 8
    assert cfg.model.plugins[0].type == "ce" and cfg.model.plugins[0].stem is True
    assert cfg.model.backbone_args.width_mult == 0.5 and cfg.model.backbone_args.width == 32
    assert cfg.runtime.work_dir == "/tmp/x y" and cfg.train.epochs == 7 and cfg.train.clip_grad_norm == 10.0


def test_override_of_default_only_key(tmp_path):
    cfg = load(write(tmp_path, "e.yaml", "{}\n"), ["model.plugins=[{type: se}]", "model.plugins.0.reduction=8"])
    assert cfg.model.plugins == [{"type": "se", "reduction": 8}]


def test_parse_override_values():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a={x: 1}") == (["a"], {"x": 1})
    assert parse_override("a=off") == (["a"], False)  # YAML 1.1 booleans
    assert parse_override("a=") == (["a"], "")


def test_dump_round_trip(chain, tmp_path):
    cfg = load(chain, ["model.plugins.0.stages=[2]"])
    out = str(tmp_path / "resolved.yaml")
    dump(cfg, out)
    again = load(out)
    assert again == cfg and isinstance(again, Config)
    assert type(cfg.to_dict()["model"]) is dict and type(cfg.to_dict()["model"]["plugins"][0]) is dict


def test_attribute_error_names_nearest(chain):
    cfg = load(chain)
    with pytest.raises(AttributeError, match="did you mean 'lr'"):
        cfg.train.lrr


# ----------------------------------------------------------------------------- refusals

REFUSED_FILES = [
    ("trian: {lr: 0.1}\n", r"unknown key 'trian' \(did you mean 'train'\?\)"),
    ("train: {lr_rate: 0.1}\n", r"unknown key 'train.lr_rate' \(did you mean 'train.lr'\?\)"),
    ("train: {epochs: ten}\n", r"train.epochs must be an integer, got 'ten'"),
    ("train: {epochs: 1.5}\n", r"train.epochs must be an integer"),
    ("train: {nesterov: 1}\n", r"train.nesterov must be true/false"),
    ("train: {epochs: true}\n", r"train.epochs must be an integer, got True"),
    ("train: {lr: null}\n", r"train.lr must not be null"),
    ("train: {schedule: cosin}\n", r"train.schedule='cosin' is not one of .*did you mean 'cosine'"),
    ("train: {milestones: [30, x]}\n", r"train.milestones.1='x'"),
    ("train: {lr: -0.1}\n", r"train.lr=-0.1 must be > 0"),
    ("train: {wd_exempt: [norm, biass]}\n", r"train.wd_exempt: 'biass'"),
    ("train: 3\n", r"train must be a mapping"),
    ("train: {ema: false}\neval: {best_metric: ema_top1}\n", r"needs train.ema=true"),
    ("train: {schedule: multistep, milestones: [60, 30]}\n", r"must be increasing"),
    ("train: {batch_size: 10, accum_steps: 3}\n", r"not divisible"),
    ("- a\n- b\n", r"top level must be a mapping"),
    ("train: {lr: 0.1\n", r"invalid YAML"),
    ("train: {lr: 0.1}\ntrain: {lr: 0.2}\n", r"key 'train' is given twice"),
    ("train: !!python/object/apply:os.system ['echo hi']\n", r"invalid YAML"),
    ("_base_: {a: 1}\n", r"_base_ must be a list"),
    ("_base_: [missing.yaml]\n", r"missing.yaml not found \(named in"),
]


@pytest.mark.parametrize("text,pattern", REFUSED_FILES, ids=[p for _, p in REFUSED_FILES])
def test_refused_files(tmp_path, text, pattern):
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError, match=pattern) as e:
        load(path)
    assert "\n" not in str(e.value)


def test_refused_cycle_and_missing(tmp_path):
    write(tmp_path, "a.yaml", "_base_: [b.yaml]\n")
    b = write(tmp_path, "b.yaml", "_base_: [a.yaml]\n")
    with pytest.raises(ConfigError, match="include each other"):
        load(b)
    with pytest.raises(ConfigError, match="not found"):
        load(str(tmp_path / "nope.yaml"))


REFUSED_OVERRIDES = [
    ("train.lr", r"not of the form key.sub=value"),
    ("=3", r"not of the form"),
    ("train..lr=3", r"not of the form"),
    ("train.lrr=0.1", r"unknown key 'train.lrr' \(did you mean 'train.lr'\?\)"),
    ("train.epochs=abc", r"train.epochs must be an integer"),
    ("train.milestones=[1, 2", r"invalid YAML"),
    ("model.plugins.3.stages=[1]", r"index 3 is out of range for model.plugins \(1 items\)"),
    ("model.plugins.x=1", r"model.plugins is a list, 'x' is not an index"),
    ("train.lr.x=1", r"train.lr is a float, not a mapping"),
]


@pytest.mark.parametrize("override,pattern", REFUSED_OVERRIDES, ids=[o for o, _ in REFUSED_OVERRIDES])
def test_refused_overrides(chain, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load(chain, [override])


def test_read_tree_keeps_unknown_for_validation(tmp_path):
    # read_tree alone does no schema work: tools can inspect raw files
    assert read_tree(write(tmp_path, "x.yaml", "foo: {bar: 1}\n")) == {"foo": {"bar": 1}}


# ----------------------------------------------------------------------------- real schema + CLI

def test_real_schema_documents_every_key():
    from engine.schema import describe
    rows = describe()
    keys = [k for k, _, _ in rows]
    assert {"train.lr", "eval.interval", "runtime.work_dir", "dist.backend", "model.backbone"} <= set(keys)
    assert all(doc.strip() for _, _, doc in rows)


def test_cli_refuses_bad_override_and_writes_nothing(tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    (work / "keep.txt").write_text("old run")
    r = subprocess.run([sys.executable, "-m", "tools.train", "configs/default.yaml", f"runtime.work_dir={work}",
                        "train.lrr=0.1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown key 'train.lrr'" in lines[0] and "did you mean" in lines[0]
    assert sorted(os.listdir(work)) == ["keep.txt"]


SMALL = """model: {backbone: cifar_resnet20, num_classes: 4}
data: {dataset: synthetic, input_size: 16, workers: 0, synthetic: {train_size: 16, val_size: 8, num_classes: 4}}
"""


@pytest.mark.parametrize("override, message", [
    ("model.plugins=[{type: se, reduction: 0}]", r"model\.plugins\.0\.reduction=0: block 'se' takes an integer >= 1"),
    ("model.plugins=[{type: ce, reduction: 0}]", r"model\.plugins\.0\.reduction=0: block 'ce' takes an integer >= 1"),
    ("model.plugins=[{type: ed, groups: 0}]", r"model\.plugins\.0\.groups=0: block 'ed' takes an integer >= 1"),
    ("model.plugins=[{type: ce, group_channels: 0}]", r"group_channels=0: block 'ce' takes an integer >= 1"),
    ("model.plugins=[{type: ce, group_channels: -16}]", r"group_channels=-16: block 'ce' takes an integer >= 1"),
    ("model.plugins=[{type: ce, group_channels: abc}]", r"plugins\.0\.group_channels='abc': .* an integer >= 1"),
    ("model.plugins=[{type: ce, newton_iters: -1}]", r"newton_iters=-1: block 'ce' takes an integer >= 0"),
    ("model.plugins=[{type: ce, pooling: yes_please}]", r"pooling='yes_please': block 'ce' takes true or false"),
    ("model.plugins=[{type: ce, momentum: 5}]", r"momentum=5: block 'ce' takes a number in \[0, 1\]"),
    ("model.plugins=[{type: ce, eps: .nan}]", r"eps=nan: block 'ce' takes a number > 0"),
    ("model.plugins=[{type: ed, variant: C}]", r"variant='C': block 'ed' takes one of null, 'A', 'B'"),
    ("model.conv={type: we, lwe: maybe}", r"model\.conv\.lwe='maybe': conv 'we' takes true or false"),
    ("model.conv={type: we, reduction: 0.5}", r"model\.conv\.reduction=0\.5: conv 'we' takes an integer >= 1"),
])
def test_block_and_conv_options_are_checked_at_load(tmp_path, override, message):
    """Issue 10.6: every block/conv option has a declared type and range, refused in one line naming the key."""
    path = write(tmp_path, "small.yaml", SMALL)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, [override])
    assert "\n" not in str(info.value)


def test_every_block_and_conv_declares_its_options():
    """A block whose OPTIONS and constructor differ cannot be registered (so none reaches a model unchecked)."""
    import torch.nn as nn

    from blocks.registry import BLOCKS, CONVS, Block, Option, register_block

    assert all(hasattr(cls, "OPTIONS") for cls in list(BLOCKS.values()) + list(CONVS.values()))

    class Undeclared(Block):
        OPTIONS = {"ratio": Option(int, low=1)}

        def __init__(self, channels, ratio=2, gain=1.0):
            super().__init__()

    with pytest.raises(ValueError, match=r"undeclared: \['gain'\]"):
        register_block("undeclared_test_block")(Undeclared)
    assert "undeclared_test_block" not in BLOCKS

    class NotABlock(nn.Module):
        OPTIONS = {}

        def __init__(self, channels):
            super().__init__()

    with pytest.raises(TypeError, match="NotABlock must subclass blocks.registry.Block"):
        register_block("not_a_block_test")(NotABlock)
    assert "not_a_block_test" not in BLOCKS


@pytest.mark.parametrize("override, message", [
    ("model.conv.exclude=[stme]", r"'stme' is not a conv role \(did you mean 'stem'\?\)"),
    ("model.conv.exclude=stem", r"model\.conv\.exclude='stem': must be a list"),
    ("train.lr=.nan", r"train\.lr=nan is not a finite number"),
    ("train.lr=.inf", r"train\.lr=inf is not a finite number"),
    ("train.weight_decay=.nan", r"train\.weight_decay=nan is not a finite number"),
    ("train.clip_grad_norm=-.inf", r"train\.clip_grad_norm=-inf is not a finite number"),
    ("data.augment.hflip=.nan", r"data\.augment\.hflip=nan is not a finite number"),
    ("data.mean=[0.5, .nan, 0.5]", r"data\.mean=\[0\.5, nan, 0\.5\] is not a finite number"),
])
def test_silently_ignored_values_are_refused(tmp_path, override, message):
    """Issue 10.5: a misspelt exclude role, a string for the exclude list, nan/inf for a number."""
    path = write(tmp_path, "small.yaml", SMALL)
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])
    if override.startswith("model.conv.exclude"):
        with pytest.raises(ConfigError, match=r"model\.conv\.exclude="):  # also with a we conv (where it matters)
            load_config(path, ["model.conv={type: we}", override])


def test_ce_pooling_on_1x1_maps_is_refused_at_load(tmp_path):
    """Issue 10.6: CE pooling: true where a stage's maps are 1x1 loaded fine and crashed at step 1."""
    import torch

    from models import build_model
    path = write(tmp_path, "r18.yaml", SMALL.replace("cifar_resnet20", "resnet18").replace("input_size: 16",
                                                                                           "input_size: 32"))
    with pytest.raises(ConfigError, match=r"model\.plugins\.0: block 'ce' with these options needs feature maps of "
                                          r"at least 2x2, but stage 4 of resnet18 has 1x1 at input size 32"):
        load_config(path, ["model.plugins=[{type: ce, pooling: true}]"])
    with pytest.raises(ConfigError, match=r"its stem of resnet18 has 1x1 at input size 2"):
        load_config(path, ["model.plugins=[{type: ce, pooling: true, stages: [], stem: true}]", "data.input_size=2"])
    ok = load_config(path, ["model.plugins=[{type: ce, pooling: true, stages: [1, 2, 3]}]"])
    model = build_model(ok.model).train()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)  # the accepted stages really run
    refused = dict(ok.model, plugins=[{"type": "ce", "pooling": True, "stages": [4]}])
    with pytest.raises(RuntimeError):  # what the refusal saves the user from
        build_model(refused).train()(torch.randn(2, 3, 32, 32))


def _alias_bomb(levels=9):
    lines = ['a0: &a0 [x, x, x, x, x, x, x, x, x, x]']
    for i in range(1, levels):
        lines.append(f'a{i}: &a{i} [' + ', '.join([f'*a{i - 1}'] * 10) + ']')
    return '\n'.join(lines) + f'\nmodel: *a{levels - 1}\n'


@pytest.mark.parametrize("text, message", [
    (_alias_bomb(), r"aliases \(\*name\) expand to more than 100000 values"),
    ("model: " + "[" * 5000 + "]" * 5000, r"line 1: nested more than 32 levels deep"),
    ("model: " + "{a: " * 5000 + "}" * 5000, r"line 1: nested more than 32 levels deep"),
    ("train: {epochs: " + "9" * 5000 + "}", r"integer 999999999999\.\.\. has 5000 digits"),
    ("train: {epochs: " + "9" * 30 + "}", r"has 30 digits \(at most 18\)"),
])
def test_hostile_yaml_is_refused_in_one_line_quickly(tmp_path, text, message):
    import time
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    assert time.perf_counter() - start < 1.0
