"""The watchdog (engine/watchdog.py): a stopped or hung rank or data worker ends the run in one line, exit 76."""
import glob
import json
import os
import signal
import subprocess
import time

import pytest

from engine.guard import EXIT_PEER_LOST
from engine.watchdog import find_stall
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
    from engine.fields import ConfigError
    from tests.engine_helpers import tiny_cfg
    with pytest.raises(ConfigError, match=r"dist.watchdog_s=1800 is not below dist.timeout_min=30"):
        tiny_cfg("/nonexistent", "dist.watchdog_s=1800")


def _victim(run_dir, target):
    """pid of rank 1 ('rank') or of rank 1's first data worker ('worker'), from their heartbeat files."""
    pattern = "rank1.json" if target == "rank" else "rank1-worker*-*.json"
    for path in glob.glob(os.path.join(run_dir, "blocklab-run-*", pattern)):
        try:
            return json.loads(open(path).read())["pid"]
        except (OSError, ValueError, KeyError):
            pass
    return None


@pytest.mark.parametrize("target", ["rank", "worker"])
def test_a_stopped_rank_or_worker_ends_a_two_process_run_in_one_line(tmp_path, target):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    runs = tmp_path / "runs"
    runs.mkdir()
    env = {**launch_env(), "TMPDIR": str(runs)}  # the launcher's run directory lands where the test can see it
    log = open(tmp_path / "log.txt", "w+")  # a file, not a pipe nobody reads while it runs
    proc = subprocess.Popen([os.path.join(ROOT, "train.sh"), str(cfg), "2", f"runtime.work_dir={tmp_path / 'w'}",
                             "dist.watchdog_s=3"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, pid = time.monotonic() + 240, None
        while pid is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            ranks = glob.glob(str(runs / "blocklab-run-*" / "rank*.json"))
            armed = any(json.loads(open(p).read()).get("armed") for p in ranks if "worker" not in os.path.basename(p))
            pid = _victim(runs, target) if armed else None
        assert pid is not None, (tmp_path / "log.txt").read_text()
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        proc.wait(timeout=120)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    err = (tmp_path / "log.txt").read_text()
    assert proc.returncode == EXIT_PEER_LOST, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error") or "Traceback" in ln]
    who = f"rank 1 (pid {pid})" if target == "rank" else f"of rank 1 (pid {pid})"
    assert len(errors) == 1 and errors[0].startswith("error: watchdog: ") and who in errors[0], err
    assert "is stopped (SIGSTOP" in errors[0] and "last step" in errors[0]
    assert took < 60, took  # 3 s of no progress, then about a second to notice (loaded test machines: slack)
    assert not glob.glob(str(runs / "blocklab-run-*")), "the launcher removes its run directory"
