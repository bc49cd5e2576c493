"""The fast paths users turn on (train.amp, train.channels_last, train.compile, several processes with
SyncBN and CE sync_stats) train every block without nan, through the real Trainer and ./train.sh on CPU."""
import math

import pytest
import torch

from engine.trainer import Trainer
from models import BACKBONES
from tests.engine_helpers import run_train_sh, tiny_cfg


BLOCKS = {  # the options of configs/ablation (CIFAR ResNet-20), one block each, and all of them at once
    "ce": ["model.plugins=[{type: ce, stem: true}]"],
    "ed": ["model.plugins=[{type: ed, groups: 4}]"],
    "we": ["model.conv={type: we, lwe: true, mwe: true}"],
    "se": ["model.plugins=[{type: se, reduction: 16}]"],
    "all": ["model.plugins=[{type: ce, stem: true}, {type: se, reduction: 16}, {type: ed, groups: 4}]",
            "model.conv={type: we, lwe: true, mwe: true}"],
}


def train(tmp_path, *overrides):
    cfg = tiny_cfg(tmp_path / "run", "train.epochs=1", "train.label_smoothing=0.0", *overrides)
    t = Trainer(cfg)
    result = t.train()
    return t, result


def assert_finite(t, result):
    assert result["status"] == "done" and math.isfinite(result["metrics"]["loss"]), result
    bad = [k for k, v in t.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"non-finite after training: {bad[:5]}"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_every_block_trains_in_every_precision_and_layout(tmp_path, block, amp, layout):
    t, result = train(tmp_path, *BLOCKS[block], f"train.amp={amp}",
                      f"train.channels_last={'true' if layout == 'channels_last' else 'false'}")
    assert_finite(t, result)
    if layout == "channels_last":
        assert t.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("amp,layout,tol", [("none", "channels_last", 1e-2), ("bf16", "channels_last", 0.3),
                                            ("fp16", "nchw", 0.3)])
def test_compiled_training_of_every_block_matches_eager(tmp_path, monkeypatch, amp, layout, tol):
    # aot_eager traces forward and backward like inductor does (graph breaks, autograd Functions, CE's
    # kernel choice under tracing) without generating code, so it runs in seconds on CPU. The weights after
    # 4 steps must agree with eager's to `tol` of the update itself (the graphs sum in other orders, which
    # 4 steps at this LR amplify: fp32 ~1e-6 on one thread, ~6e-4 on two; bf16/fp16 round differently)
    # A CIFAR ResNet-8 (one block per stage, every block and WE conv on each): tracing time grows with the
    # number of blocks, and one of each kind per stage is what the compiled path has to get right
    monkeypatch.setitem(BACKBONES, "cifar_resnet8", BACKBONES["cifar_resnet20"])
    common = [*BLOCKS["all"], "model.backbone=cifar_resnet8", "train.lr=0.05", f"train.amp={amp}",
              f"train.channels_last={'true' if layout != 'nchw' else 'false'}"]
    t_c, res_c = train(tmp_path / "compiled", *common, "train.compile=true", "train.compile_backend=aot_eager")
    t_e, res_e = train(tmp_path / "eager", *common)
    assert_finite(t_c, res_c)
    assert t_c.net is not t_c.model and hasattr(t_c.net, "_orig_mod")  # it really ran compiled
    init = Trainer(tiny_cfg(tmp_path / "init", *common)).model.state_dict()  # same seed: the same start
    c, e = t_c.model.state_dict(), t_e.model.state_dict()
    keys = [k for k in e if e[k].is_floating_point()]
    apart = sum(((c[k] - e[k]).double() ** 2).sum() for k in keys) ** 0.5
    update = sum(((e[k] - init[k]).double() ** 2).sum() for k in keys) ** 0.5
    assert update > 0 and apart <= tol * update, (float(apart), float(update))


def test_train_sh_two_processes_sync_bn_ce_sync_stats_compiled(tmp_path):
    # the README's headline command with every fast path on: 2 gloo processes, SyncBN, CE's cross-process
    # statistics, bf16, channels_last and torch.compile, on a model with every block
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model:
  backbone: cifar_resnet20
  num_classes: 4
  conv: {{type: we, lwe: true, mwe: true}}
  plugins: [{{type: ce, stem: true, sync_stats: true}}, {{type: se, reduction: 16}}, {{type: ed, groups: 4}}]
data: {{dataset: synthetic, input_size: 8, workers: 1, synthetic: {{train_size: 32, val_size: 8}}}}
train: {{epochs: 1, batch_size: 8, lr: 0.05, amp: bf16, channels_last: true, sync_bn: true,
        compile: true, compile_backend: aot_eager}}
runtime: {{device: cpu, work_dir: {tmp_path / 'run'}, log_interval: 1, tensorboard: false}}
""")
    r = run_train_sh(cfg, 2, cwd=tmp_path, timeout=600)
    out = r.out
    assert r.returncode == 0, out[-3000:]
    assert "world size 2 (gloo)" in out and "mixed precision: bf16 autocast on cpu" in out, out[-3000:]
    assert "torch.compile, backend aot_eager" in out, out[-3000:]
    assert "val epoch 1" in out and "nan" not in out.split("val epoch 1")[1], out[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "epoch_001.pth", weights_only=True)
    model = state["model"]
    assert any("running_mean" in k for k in model) and state["step"] == 4
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())
