"""What a run prints (issue 19 items 2 and 8): a short summary with the threads, one numbering of epochs in the
stop and resume messages, each message once whatever the number of processes, honest max_steps and tensorboard lines."""
import os
import re
import signal
import subprocess

import pytest

from core.config import dump
from engine.threads import MAX_AUTO, available_cores, choose_threads
from engine.trainer import Trainer
from tests.engine_helpers import ROOT, launch_env, tiny_cfg


@pytest.mark.parametrize("setting, env, procs, expected", [
    (3, {"OMP_NUM_THREADS": "5"}, 1, (3, "runtime.threads")),
    (None, {"OMP_NUM_THREADS": "5"}, 2, (5, "OMP_NUM_THREADS=5")),
    (None, {}, 1, None),
    (None, {}, 2, None),
    (None, {}, 1000, None),
])
def test_threads_setting_then_omp_then_cores_per_process(setting, env, procs, expected, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(procs))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine
    cores = available_cores()
    if expected is None:
        n = max(1, min(cores // procs, MAX_AUTO))
        expected = (n, f"{cores} core{'s' * (cores != 1)}, {procs} process{'es' * (procs != 1)}")
    assert choose_threads(setting, env) == expected


def test_a_busy_machine_gets_one_thread_per_process(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr("engine.threads.available_cores", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (6.5, 0.0, 0.0))
    assert choose_threads(None, {}) == (1, "4 cores, 1 process; busy machine: load 6.5, set runtime.threads to use "
                                           "more")
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 0.0, 0.0))
    assert choose_threads(None, {}) == (4, "4 cores, 1 process")


def _tiny_yaml(tmp_path, work):
    cfg = tmp_path / "tiny.yaml"  # 2 epochs of 60 steps (batch 8 over the processes), 9 validation images
    dump(tiny_cfg(work, "runtime.log_interval=1", train_size=480, val_size=9, epochs=2), str(cfg))
    return cfg


def test_two_processes_print_a_summary_and_stop_and_resume_messages_that_agree(tmp_path):
    work = tmp_path / "run"
    env = launch_env()
    del env["OMP_NUM_THREADS"]  # the run chooses
    cmd = [os.path.join(ROOT, "train.sh"), str(_tiny_yaml(tmp_path, work)), "2"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "[3/60]" in line:
            p.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + p.stdout.read()
    assert p.wait(timeout=180) == 75, out

    start = out.split("epoch 1/2 [1/60]")[0].splitlines()
    assert len(start) <= 8 and not any(line.endswith("config:") for line in start), out  # not ~75 lines of config
    assert "model: cifar_resnet20, 4 classes; blocks: none" in out
    assert "batch 8 (4 per process x 1 accumulation)" in out
    cores = available_cores()
    assert re.search(rf"threads: \d+ per process \({cores} cores, 2 processes[;)]", out), out
    assert (work / "config.yaml").read_text().count("\n") > 50  # the full resolved config is in the work dir
    assert out.count("received SIGTERM") == 1 and out.count("stopped by SIGTERM") == 1, out  # once, not per rank
    stop = re.search(r"stopped by SIGTERM (in epoch 1/2 at iteration (\d+)/60 \(step \2\))", out)
    assert stop, out

    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"resumed from \S+ " + re.escape(stop.group(1)), r.stdout), r.stdout  # the same words
    assert "val epoch 2/2" in r.stdout


def test_max_steps_prints_its_step_line_and_where_the_checkpoint_is(tmp_path, capsys):
    work = tmp_path / "run"
    Trainer(tiny_cfg(work, "runtime.log_interval=50")).train()  # 2 epochs of 4 steps, checkpoints saved
    capsys.readouterr()
    result = Trainer(tiny_cfg(work, "train.epochs=3", "runtime.log_interval=50", "runtime.max_steps=10")).train()
    out = capsys.readouterr().out
    assert result["status"] == "max_steps"
    assert "epoch 3/3 [2/4] loss" in out, out
    assert (f"stopped at runtime.max_steps=10 in epoch 3/3 at iteration 2/4 (step 10); these steps are not saved "
            f"(max_steps never saves); last checkpoint: {work}/checkpoints/epoch_002.pth") in out, out
    assert "checkpoint: None" not in out

    Trainer(tiny_cfg(tmp_path / "new", "runtime.max_steps=1")).train()
    assert "(step 1); these steps are not saved (max_steps never saves); no checkpoint written" in \
        capsys.readouterr().out


def test_the_tensorboard_hint_works_where_tensorboard_is_not_installed(tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    Trainer(tiny_cfg(tmp_path / "run", "train.epochs=1", "runtime.tensorboard=true")).train()
    tb = tmp_path / "run" / "tb"
    assert f"tensorboard logs: {tb}  (pip install tensorboard && tensorboard --logdir {tb})" in capsys.readouterr().out
