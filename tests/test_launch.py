"""The launcher: ./train.sh with torchrun and 2 CPU processes (gloo), preempted by SIGTERM, then resumed."""
import os
import signal
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_sh_two_processes_sigterm_75_then_resume(tmp_path):
    work = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""
model: {{backbone: cifar_resnet20, num_classes: 4}}
data: {{dataset: synthetic, input_size: 8, workers: 0, synthetic: {{train_size: 480, val_size: 9}}}}
train: {{epochs: 2, batch_size: 8, lr: 0.05}}
eval: {{interval: 1}}
runtime: {{device: cpu, work_dir: {work}, log_interval: 1, tensorboard: false}}
""")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    cmd = [os.path.join(ROOT, "train.sh"), str(cfg), "2", "train.label_smoothing=0.1"]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "[3/60]" in line:
            p.send_signal(signal.SIGTERM)  # to train.sh, which hands it to torchrun, which hands it to both ranks
            break
    out = "".join(lines) + p.stdout.read()
    assert p.wait(timeout=180) == 75, out
    assert "world size 2 (gloo)" in out
    step = [n for n in os.listdir(work / "checkpoints") if n.startswith("step_")]
    assert len(step) == 1, out
    state = torch.load(work / "checkpoints" / step[0], weights_only=True)
    assert state["epoch"] == 0 and 3 <= state["iter_in_epoch"] < 60 and len(state["rng"]) == 2
    assert state["config"]["train"]["label_smoothing"] == 0.1  # overrides reach the workers

    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resumed from {work}/checkpoints/{step[0]}" in r.stdout
    assert "val epoch 2" in r.stdout and "(9 images" in r.stdout
    final = torch.load(work / "checkpoints" / "epoch_002.pth", weights_only=True)
    assert final["step"] == 120 and final["epoch"] == 2
