"""Shared helpers for the engine tests: a tiny model, a tiny synthetic-data config, ./train.sh as users start it."""
import os
import subprocess
import sys

import torch
import torch.nn as nn

from engine.config import from_tree


class TinyNet(nn.Module):
    """conv-BN-ReLU x2 + a marked scalar + linear head: every kind of parameter the optimizer groups."""

    no_weight_decay = ("theta",)

    def __init__(self, num_classes=4, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.theta = nn.Parameter(torch.zeros(1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x))) * torch.sigmoid(self.theta) * 2
        return self.fc(x.mean((2, 3)))


def tiny_model(model_cfg):
    return TinyNet(model_cfg["num_classes"])


def tiny_cfg(work_dir, *overrides, train_size=32, val_size=19, batch=8, epochs=2, size=8):
    tree = {
        "model": {"backbone": "cifar_resnet20", "num_classes": 4},
        "data": {"dataset": "synthetic", "input_size": size, "workers": 0, "pin_memory": False,
                 "synthetic": {"train_size": train_size, "val_size": val_size}},
        "train": {"epochs": epochs, "batch_size": batch, "lr": 0.2, "schedule": "cosine", "warmup_epochs": 0.5,
                  "weight_decay": 1e-3, "wd_exempt": ["norm", "bias", "marked"], "label_smoothing": 0.1,
                  "nesterov": True},
        "eval": {"batch_size": 8, "interval": 1},
        "runtime": {"work_dir": str(work_dir), "device": "cpu", "log_interval": 2, "tensorboard": False},
    }
    return from_tree(tree, list(overrides))


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b, atol=0.0, rtol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK")


def launch_env():
    """A user's shell: none of torchrun's variables inherited from the test process, one OMP thread per process,
    the scripts run by this test's Python (tests/test_install.py checks how they find one without PYTHON)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHON"] = sys.executable
    return env


def run_train_sh(cfg, nproc, *overrides, cwd, timeout=300):
    """``./train.sh CFG NPROC [overrides]`` run to the end; the CompletedProcess with ``out`` = stdout + stderr."""
    r = subprocess.run([os.path.join(ROOT, "train.sh"), str(cfg), str(nproc), *overrides], cwd=cwd, env=launch_env(),
                       capture_output=True, text=True, timeout=timeout)
    r.out = r.stdout + r.stderr
    return r
