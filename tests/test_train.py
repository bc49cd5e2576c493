"""Training loop: schedules, parameter groups, exact resume (epoch boundary and SIGTERM mid-epoch), refusals."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from core.fields import ConfigError
from engine.evaluator import evaluate
from engine.optim import build_optimizer, lr_factor
from engine.trainer import Trainer
from tests.engine_helpers import TinyNet, assert_same, tiny_cfg, tiny_model, weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cfg, hook=None):
    t = Trainer(cfg, model_fn=tiny_model)
    seen = []
    tf = t.train_tf
    t.train_tf = lambda x: (seen.append(x.clone()), tf(x))[1]
    if hook is not None:
        hook(t)
    result = t.train()
    return t, result, seen


# ----------------------------------------------------------------------------- schedules and groups

def sched(**kw):
    base = dict(epochs=10, warmup_epochs=0, warmup_start_factor=0.1, schedule="step", step_size=3,
                milestones=[2, 5], gamma=0.1, power=2.0, min_lr=0.0, lr=1.0)
    return {**base, **kw}


def test_lr_schedules_per_iteration():
    ipe = 10
    assert lr_factor(29, sched(), ipe) == 1.0 and lr_factor(30, sched(), ipe) == pytest.approx(0.1)
    assert lr_factor(60, sched(), ipe) == pytest.approx(0.01)
    ms = sched(schedule="multistep")
    assert [lr_factor(s, ms, ipe) for s in (19, 20, 49, 50)] == pytest.approx([1, 0.1, 0.1, 0.01])
    cos = sched(schedule="cosine", warmup_epochs=1, min_lr=0.1)
    assert lr_factor(0, cos, ipe) == pytest.approx(0.1)            # warmup starts at start_factor
    assert lr_factor(5, cos, ipe) == pytest.approx(0.55)           # linear, per iteration
    assert lr_factor(10, cos, ipe) == pytest.approx(1.0)           # cosine starts after warmup
    assert lr_factor(55, cos, ipe) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, cos, ipe) == pytest.approx(0.1)
    poly = sched(schedule="poly")
    assert lr_factor(50, poly, ipe) == pytest.approx(0.25)
    assert lr_factor(7, sched(schedule="step", warmup_epochs=1.5), ipe) == pytest.approx(0.1 + 0.9 * 7 / 15)


def test_weight_decay_exemptions():
    m = TinyNet()
    def groups(exempt):
        opt = build_optimizer(m, {"weight_decay": 0.1, "wd_exempt": exempt, "lr": 0.1, "momentum": 0.9,
                                  "nesterov": True})
        return {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    names = {id(p): n for n, p in m.named_parameters()}
    assert set(groups([])) == {0.1}
    g = groups(["norm", "bias", "marked"])
    assert sorted(names[i] for i in g[0.0]) == ["bn1.bias", "bn1.weight", "bn2.bias", "bn2.weight", "fc.bias", "theta"]
    g = groups(["marked"])
    assert [names[i] for i in g[0.0]] == ["theta"]


# ----------------------------------------------------------------------------- resume

def test_restart_after_epoch_1_matches_uninterrupted(tmp_path):
    over = ("train.ema=true", "train.ema_decay=0.9")
    ref, res, _ = run(tiny_cfg(tmp_path / "a", *over))
    assert res["status"] == "done" and ref.step == 8

    def stop_after_epoch_1(t):
        orig = t.validate
        t.validate = lambda: (orig(), t.stop.request())[0]  # a request during validation would interrupt it
    first, res1, _ = run(tiny_cfg(tmp_path / "b", *over), stop_after_epoch_1)
    assert res1["status"] == "preempted" and first.epoch == 1 and first.step == 4
    again, res2, _ = run(tiny_cfg(tmp_path / "b", *over))
    assert res2["status"] == "done" and again.step == 8
    assert_same(weights(again.model), weights(ref.model))
    assert_same(weights(again.ema.module), weights(ref.ema.module))
    assert again.optimizer.param_groups[0]["lr"] == ref.optimizer.param_groups[0]["lr"]
    assert res2["metrics"] == {**ref_metrics(res), "time_s": res2["metrics"]["time_s"]}
    lines = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [x["epoch"] for x in lines if x["kind"] == "val"] == [1, 2]
    best = json.load(open(tmp_path / "b" / "checkpoints" / "best.json"))  # kept across the restart
    for key in ("top1", "top5"):
        assert best[f"best_{key}"] == pytest.approx(max(x[key] for x in lines if x["kind"] == "val"), abs=1e-5)


def ref_metrics(res):
    return {k: v for k, v in res["metrics"].items()}


def test_sigterm_mid_epoch_continues_with_same_batches(tmp_path):
    over = ("train.accum_steps=2", "runtime.keep_last=1")
    ref, _, ref_seen = run(tiny_cfg(tmp_path / "a", *over))
    assert len(ref_seen) == 16  # 2 epochs x 4 steps x 2 micro-batches

    def sigterm_at_step_6(t):
        orig = t.optimizer_step
        def step():
            orig()
            if t.step == 5:  # the 6th step of the run: 2nd of epoch 2
                os.kill(os.getpid(), signal.SIGTERM)
        t.optimizer_step = step
    first, res1, seen1 = run(tiny_cfg(tmp_path / "b", *over), sigterm_at_step_6)
    assert res1["status"] == "preempted" and first.stop.signame == "SIGTERM"
    assert (first.epoch, first.iter_in_epoch, first.step) == (1, 2, 6)
    ckpts = os.listdir(tmp_path / "b" / "checkpoints")
    assert "step_0000006.pth" in ckpts and "epoch_001.pth" not in ckpts  # pruned to keep_last=1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again

    second, res2, seen2 = run(tiny_cfg(tmp_path / "b", *over))
    assert res2["status"] == "done" and second.step == 8
    assert len(seen1) == 12 and len(seen2) == 4
    for a, b in zip(ref_seen, seen1 + seen2):  # the same remaining micro-batches, in the same order
        assert torch.equal(a, b)
    assert_same(weights(second.model), weights(ref.model))


def test_cli_sigterm_exits_75_then_resumes(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
_base_: [{ROOT}/configs/_base_/runtime.yaml]
model: {{backbone: cifar_resnet20, num_classes: 4}}
data: {{dataset: synthetic, input_size: 8, workers: 0, synthetic: {{train_size: 4000, val_size: 8}}}}
train: {{epochs: 1, batch_size: 4, lr: 0.05}}
runtime: {{device: cpu, work_dir: {tmp_path / 'run'}, log_interval: 1, tensorboard: true}}
""")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "tools.train", str(cfg)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "[2/1000]" in line:
            p.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + p.stdout.read()
    assert p.wait(timeout=120) == 75, out
    ckpt = tmp_path / "run" / "checkpoints"
    (name,) = [n for n in os.listdir(ckpt) if n.startswith("step_")]
    step = int(name[5:12])
    assert "run the same command to continue" in out
    state = torch.load(ckpt / name, weights_only=True)
    assert state["iter_in_epoch"] == step and state["config"]["train"]["lr"] == 0.05
    assert os.path.isdir(tmp_path / "run" / "tb") and os.path.isfile(tmp_path / "run" / "config.yaml")


# ----------------------------------------------------------------------------- evaluation and refusals

@pytest.mark.parametrize("n,world", [(19, 2), (10, 3), (5, 4)])
def test_eval_counts_each_image_once_and_refuses_a_padding_sampler(n, world):
    from data import ShardSampler
    ds = TensorDataset(torch.randint(0, 255, (n, 3, 4, 4), dtype=torch.uint8), torch.arange(n) % 3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    total = 0
    for rank in range(world):  # one "rank" at a time (no process group)
        loader = DataLoader(ds, batch_size=2, sampler=ShardSampler(n, rank, world))
        total += evaluate(model, loader, torch.device("cpu"), lambda x: x.float())["count"]
    assert total == n
    padding = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, num_replicas=world, rank=0))
    with pytest.raises(ValueError, match="DistributedSampler pads"):
        evaluate(model, padding, torch.device("cpu"), lambda x: x.float())


def test_refused_resume_writes_nothing(tmp_path):
    run(tiny_cfg(tmp_path / "a", "train.epochs=1"))
    before = {p: os.path.getmtime(os.path.join(tmp_path / "a", p)) for p in os.listdir(tmp_path / "a")}
    with pytest.raises(ConfigError, match=r"holds a run of another recipe \(model\.num_classes: 4 -> 5\)"):
        Trainer(tiny_cfg(tmp_path / "a", "model.num_classes=5", "train.epochs=1"), model_fn=tiny_model)
    with pytest.raises(ConfigError, match="different model"):  # forced past config.yaml: the checkpoint's config
        Trainer(tiny_cfg(tmp_path / "a", "model.num_classes=5", "train.epochs=1", "runtime.resume_mismatch=allow"),
                model_fn=tiny_model)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        Trainer(tiny_cfg(tmp_path / "a", "train.batch_size=64"), model_fn=tiny_model)
    after = {p: os.path.getmtime(os.path.join(tmp_path / "a", p)) for p in os.listdir(tmp_path / "a")}
    assert before == after
    with pytest.raises(ConfigError, match="not found"):
        Trainer(tiny_cfg(tmp_path / "c", "runtime.resume_from=/nonexistent.pth"), model_fn=tiny_model)
    assert not os.path.exists(tmp_path / "c")


def test_test_tool_reproduces_final_accuracy(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{backbone: cifar_resnet20, num_classes: 4}}
data: {{dataset: synthetic, input_size: 8, workers: 0, synthetic: {{train_size: 16, val_size: 11}}}}
train: {{epochs: 1, batch_size: 8, lr: 0.05}}
runtime: {{device: cpu, work_dir: {tmp_path / 'run'}, tensorboard: false}}
""")
    from engine.config import load_config
    from tools import test as test_tool
    result = Trainer(load_config(str(cfg))).train()
    ckpt = result["checkpoint"]
    assert test_tool.run([str(cfg), ckpt]) == 0
    out = json.load(open(tmp_path / "run" / "test_epoch_001.json"))
    assert out["count"] == out["dataset_size"] == 11
    assert out["top1"] == pytest.approx(result["metrics"]["top1"]) and math.isfinite(out["loss"])
    assert test_tool.run([str(cfg), str(tmp_path / "missing.pth")]) == 2


def test_engine_options_and_nonfinite_loss(tmp_path):
    from engine.guard import NonFiniteError
    t, res, _ = run(tiny_cfg(tmp_path / "a", "train.channels_last=true", "train.clip_grad_norm=0.5",
                             "train.accum_steps=2", "train.max_nonfinite=1", "train.ema=true", "train.epochs=1",
                             "runtime.ckpt_interval_steps=3", "eval.best_metric=ema_top1"))
    assert res["status"] == "done" and "ema_top1" in res["metrics"]
    assert t.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(NonFiniteError, match="training loss is nan at step 2"):  # checked at log steps
        run(tiny_cfg(tmp_path / "b", "train.lr=1e30", "train.epochs=1"))
    with pytest.raises(NonFiniteError, match="2 steps in a row"):  # checked every step, skips 1 bad update
        run(tiny_cfg(tmp_path / "c", "train.lr=1e30", "train.epochs=1", "train.max_nonfinite=1"))


def test_resume_with_another_batch_size_keeps_the_schedule_in_epochs(tmp_path):
    """Issue 10.5: 4 -> 8 steps per epoch after epoch 1 of 3: no second warmup, cosine still ends at 0."""
    over = ("train.epochs=3", "train.warmup_epochs=1")

    def stop_after_epoch_1(t):
        orig = t.validate
        t.validate = lambda: (orig(), t.stop.request())[0]  # a request during validation would interrupt it
    first, res1, _ = run(tiny_cfg(tmp_path / "w", *over), stop_after_epoch_1)
    assert res1["status"] == "preempted" and first.step == 4
    cfg = tiny_cfg(tmp_path / "w", *over, batch=4)
    t = Trainer(cfg, model_fn=tiny_model)
    assert t.iters_per_epoch == 8 and t.epoch == 1
    expected = cfg.train.lr * lr_factor(8, cfg.train, 8)  # epoch 1.0 of the schedule, past the warmup
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert t.train()["status"] == "done" and t.step == 4 + 2 * 8
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine's end, not 0.004


class EvalNaNNet(TinyNet):
    """Finite in training, nan in eval: what diverged running statistics (CE momentum 5) do."""

    def forward(self, x):
        out = super().forward(x)
        return out if self.training else out * float("nan")


def test_nonfinite_validation_stops_without_best_checkpoint(tmp_path):
    """Issue 10.5: a nan validation loss stops the run (exit 3 through tools.train), saving nothing of it."""
    from engine.guard import NonFiniteError
    t = Trainer(tiny_cfg(tmp_path / "w"), model_fn=lambda cfg: EvalNaNNet(cfg["num_classes"]))
    with pytest.raises(NonFiniteError, match=r"validation loss is nan after epoch 1 \(this epoch is not saved\)"):
        t.train()
    ckpts = tmp_path / "w" / "checkpoints"
    assert not ckpts.exists() or not [n for n in os.listdir(ckpts) if n.endswith(".pth")]


# ----------------------------------------------------------------------------- mixed precision on CPU
@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_autocast_and_scaler_on_cpu(tmp_path, amp, dtype):
    # the GPU must not be the first place train.amp runs: CPU autocast is the same code path
    seen = []

    def hook(t):
        t.model.conv2.register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))

    t, res, _ = run(tiny_cfg(tmp_path / "run", f"train.amp={amp}", "train.epochs=1"), hook)
    assert res["status"] == "done" and math.isfinite(res["metrics"]["loss"])
    assert {(True, dtype), (False, dtype)} <= set(seen)  # training steps and evaluation both autocast
    assert all(torch.isfinite(v).all() for v in weights(t.model).values() if v.is_floating_point())
    state = torch.load(t.ckpt.latest(), weights_only=True)
    if amp == "fp16":  # the scaler ran (its step counter grew) and its state is in the checkpoint
        assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] == t.iters_per_epoch
    else:
        assert state["scaler"] is None


# ./train.sh with 2 processes, bf16 and channels_last (and CE, SyncBN, compile): tests/test_fast_paths.py
