"""The watchdog (core/watchdog.py): a stopped or hung rank or data worker ends the run in one line, exit 76."""
import glob
import json
import os
import re
import signal
import subprocess
import tempfile
import time

import pytest

from core.exits import EXIT_PEER_LOST, EXIT_PREEMPTED
from core.watchdog import find_stall
from tests.engine_helpers import ROOT, launch_env

CONFIG = """model: {backbone: cifar_resnet20, num_classes: 4}
data: {dataset: synthetic, input_size: 16, workers: 2, synthetic: {train_size: 2048, val_size: 16, num_classes: 4}}
train: {epochs: 1, batch_size: 8, lr: 0.05}
eval: {batch_size: 16}
runtime: {device: cpu, log_interval: 1, tensorboard: false}
"""


def _record(run_dir, name, **rec):
    (run_dir / f"{name}.json").write_text(json.dumps(rec))


def test_find_stall_names_the_stopped_process_then_the_rank_behind(tmp_path):
    now = time.time()
    me = os.getpid()
    _record(tmp_path, "rank0", pid=me, rank=0, step=7, phase="step", progress_t=now - 20, armed=True, watchdog_s=10)
    _record(tmp_path, "rank1", pid=me, rank=1, step=6, phase="step", progress_t=now - 19, armed=True, watchdog_s=10)
    assert find_stall(tmp_path, now - 15) is None  # not yet past the limit
    line = find_stall(tmp_path, now)
    assert "rank 1 (pid" in line and "is hung" in line and "last step 6, in a training step" in line
    assert "dist.watchdog_s=10" in line and "\n" not in line
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)
        time.sleep(0.2)
        _record(tmp_path, "rank0-worker1-1", pid=sleeper.pid, rank=0, worker=1, split="train", progress_t=now - 30)
        _record(tmp_path, "rank0", pid=me, rank=0, step=7, phase="data", progress_t=now - 20, armed=True,
                watchdog_s=10)
        assert find_stall(tmp_path, now).startswith(f"watchdog: data worker 1 of rank 0 (pid {sleeper.pid}) is "
                                                    "stopped (SIGSTOP, Ctrl-Z or a debugger)")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_unarmed_rank_is_not_watched(tmp_path):
    _record(tmp_path, "rank0", pid=os.getpid(), rank=0, step=0, phase="start", progress_t=0, armed=False,
            watchdog_s=10)
    assert find_stall(tmp_path) is None


def test_watchdog_must_be_below_the_collective_timeout():
    from core.fields import ConfigError
    from tests.engine_helpers import tiny_cfg
    with pytest.raises(ConfigError, match=r"dist.watchdog_s=1800 is not below dist.timeout_min=30"):
        tiny_cfg("/nonexistent", "dist.watchdog_s=1800")


def _runs_dir(tmp_path):
    """tmp_path/runs, the TMPDIR of the run (the launcher's run directory lands there, where the test can see it),
    linked to a short path: the ranks' data workers put AF_UNIX sockets (at most 108 bytes) under TMPDIR."""
    runs = tmp_path / "runs"
    if not runs.exists():
        runs.symlink_to(tempfile.mkdtemp(prefix="bl-runs-"))
    return runs


def _start(tmp_path, config, *overrides):
    """``./train.sh CONFIG 2`` in the background, its log in a file and the launcher's run directory under tmp_path."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(config)
    runs = _runs_dir(tmp_path)
    env = {**launch_env(), "TMPDIR": os.path.realpath(runs)}
    log = open(tmp_path / "log.txt", "w")  # a file, not a pipe nobody reads while it runs
    proc = subprocess.Popen([os.path.join(ROOT, "train.sh"), str(cfg), "2", f"runtime.work_dir={tmp_path / 'w'}",
                             *overrides], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, runs


def _heartbeats(runs):
    """{file name: record} of the ranks' and workers' heartbeat files of the running launcher."""
    out = {}
    for path in glob.glob(str(runs / "blocklab-run-*" / "*.json")):
        try:
            out[os.path.basename(path)] = json.loads(open(path).read())
        except (OSError, ValueError):
            pass
    return out


def _wait_for(proc, condition, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = condition()
        if found:
            return found
        time.sleep(0.3)
    return None


def test_sigterm_during_validation_saves_within_seconds_and_resume_validates(tmp_path):
    config = CONFIG.replace("train_size: 2048, val_size: 16", "train_size: 64, val_size: 8192")
    proc, runs = _start(tmp_path, config)
    try:
        assert _wait_for(proc, lambda: any(r.get("phase") == "val" for r in _heartbeats(runs).values())), \
            (tmp_path / "log.txt").read_text()
        os.kill(proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        proc.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == EXIT_PREEMPTED, log
    assert "validation of epoch 1 interrupted by SIGTERM: it runs again when the run resumes" in log
    assert "val epoch 1/1:" not in log and "Traceback" not in log
    assert took < 30, took  # a full validation pass here takes minutes
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["latest", "step_0000008.pth"]
    proc, _ = _start(tmp_path, config)  # the same command: validates epoch 1, then finishes
    proc.wait(timeout=600)
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, log
    assert "val epoch 1/1:" in log and "epoch 1/1 [" not in log  # no training step was repeated


def _victim(runs, target):
    """pid of rank 1 ('rank') or of one of rank 1's data workers ('worker') once rank 1 is watched, else None."""
    beats = _heartbeats(runs)
    if not beats.get("rank1.json", {}).get("armed"):
        return None
    if target == "rank":
        return beats["rank1.json"]["pid"]
    return next((r["pid"] for name, r in beats.items() if name.startswith("rank1-worker")), None)


@pytest.mark.parametrize("target", ["rank", "worker"])
def test_a_stopped_rank_or_worker_ends_a_two_process_run_in_one_line(tmp_path, target):
    proc, runs = _start(tmp_path, CONFIG, "dist.watchdog_s=3")
    try:
        pid = _wait_for(proc, lambda: _victim(runs, target))
        assert pid is not None, (tmp_path / "log.txt").read_text()
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        proc.wait(timeout=120)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "log.txt").read_text()
    assert proc.returncode == EXIT_PEER_LOST, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error") or "Traceback" in ln]
    who = f"rank 1 (pid {pid})" if target == "rank" else f"of rank 1 (pid {pid})"
    assert len(errors) == 1 and errors[0].startswith("error: watchdog: ") and who in errors[0], err
    assert "is stopped (SIGSTOP" in errors[0] and "last step" in errors[0]
    assert took < 60, took  # 3 s of no progress, then about a second to notice (loaded test machines: slack)
    assert not glob.glob(str(runs / "blocklab-run-*")), "the launcher removes its run directory"


def test_a_killed_data_worker_ends_a_two_process_run_with_76_in_one_line(tmp_path):
    """An OOM kill of a worker is a SIGKILL: exit 76 and one line, not a traceback with exit 1."""
    proc, runs = _start(tmp_path, CONFIG)
    try:
        pid = _wait_for(proc, lambda: _victim(runs, "worker"))
        assert pid is not None, (tmp_path / "log.txt").read_text()
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == EXIT_PEER_LOST, log
    errors = [ln for ln in log.splitlines() if ln.startswith("error") or "Traceback" in ln]
    assert len(errors) == 1, log  # torch says "killed by signal" or, when its periodic check sees it first, "exited"
    assert re.fullmatch(rf"error: \[rank 1\] a data loader worker \(pid(\(s\))? {pid}\) (was killed by signal: "
                        r"Killed|exited unexpectedly) \(out of memory\? .* run the same command to resume from the "
                        r"last checkpoint", errors[0]), log


def test_ctrl_c_during_test_sh_is_one_line_exit_75(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) while ./test.sh evaluates with 2 processes and workers."""
    import torch

    from core.config import parse_yaml

    from engine.config import from_tree
    from models import build_model
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG.replace("val_size: 16", "val_size: 50000"))
    torch.save(build_model(from_tree(parse_yaml(cfg.read_text())).model).state_dict(), tmp_path / "m.pth")
    runs = _runs_dir(tmp_path)
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([os.path.join(ROOT, "test.sh"), str(cfg), str(tmp_path / "m.pth"), "2",
                                 f"runtime.work_dir={tmp_path / 'w'}"], cwd=tmp_path,
                                env={**launch_env(), "TMPDIR": os.path.realpath(runs)}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        evaluating = _wait_for(proc, lambda: any(n.startswith("rank1-worker") for n in _heartbeats(runs)))
        assert evaluating, (tmp_path / "log.txt").read_text()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "log.txt").read_text()
    assert proc.returncode == EXIT_PREEMPTED, log
    assert log.strip().splitlines()[-1] == ("stopped by SIGINT: the evaluation was interrupted and wrote nothing; "
                                            "run the same command again"), log
    assert "Traceback" not in log and not (tmp_path / "w").exists()


@pytest.mark.parametrize("case", ["latest-is-a-folder", "disk-too-small"])
def test_preflight_refuses_before_the_first_step_in_one_line_writing_nothing(tmp_path, case):
    """What would fail at the first save (after an epoch of work) is checked before training: exit 74."""
    from engine.checkpoint import CheckpointError
    from engine.trainer import Trainer
    from tests.engine_helpers import tiny_cfg
    work = tmp_path / "w"
    if case == "latest-is-a-folder":
        (work / "checkpoints" / "latest").mkdir(parents=True)
        message = r"w/checkpoints/latest is a folder where the run writes its checkpoints/latest file"
    else:
        message = r"w has 0\.0 MiB free but a checkpoint needs about [0-9.]+ MiB; free some space"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    import shutil
    usage = shutil.disk_usage
    try:
        if case == "disk-too-small":
            shutil.disk_usage = lambda path: usage(path)._replace(free=1000)
        with pytest.raises(CheckpointError, match=message):
            Trainer(tiny_cfg(work))
    finally:
        shutil.disk_usage = usage
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
