"""What a user's machine does to a run: a full disk while logging (74), a tiny /dev/shm (74), an
enormous input_size (2), the path forms users type, a damaged best.pth at start, and a non-zero rank's
error without tools/launch.py. Each case is refused in one line, writes nothing it should not, and keeps
the last good checkpoint."""
import errno
import os
import re
import subprocess
import sys

import pytest

from tests.test_bad_inputs import BASE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_error(err):
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def test_enormous_input_size_is_refused_at_config_time(tmp_path, capsys, monkeypatch):
    """data.input_size=100000 used to allocate 57 TB (a DefaultCPUAllocator traceback, exit 1)."""
    from tools.train import run
    (tmp_path / "base.yaml").write_text(BASE)
    monkeypatch.chdir(REPO)
    for key in ("data.input_size", "data.eval_resize"):
        assert run([str(tmp_path / "base.yaml"), f"{key}=100000", f"runtime.work_dir={tmp_path}/work"]) == 2
        line = one_error(capsys.readouterr().err)
        assert re.search(rf"{key}=100,000 is larger than 8,192 .* 120\.0 GB as float32", line), line
        assert not (tmp_path / "work").exists()


def _train_sh(args, cwd, timeout=240, env=None):
    from tests.engine_helpers import launch_env
    e = launch_env()
    e.update(env or {})
    r = subprocess.run([os.path.join(REPO, "train.sh"), *args], cwd=cwd, env=e, capture_output=True, text=True,
                       timeout=timeout)
    r.out = r.stdout + r.stderr
    return r


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (writes fail with ENOSPC)")
@pytest.mark.parametrize("name", ["metrics.jsonl", "log.txt"])
def test_full_disk_while_logging_ends_in_one_line_with_74(tmp_path, name):
    """A per-step log file on a full disk (here: a link to /dev/full, whose writes fail with ENOSPC), through
    ./train.sh with 2 processes: exit 74, one line naming the file and the fix, the checkpoint kept."""
    (tmp_path / "base.yaml").write_text(BASE)
    work = tmp_path / "w"
    work.mkdir()
    os.symlink("/dev/full", work / name)
    r = _train_sh([str(tmp_path / "base.yaml"), "2", f"runtime.work_dir={work}", "runtime.ckpt_interval_steps=1",
                   "runtime.log_interval=2", "data.synthetic.train_size=32"], cwd=tmp_path)
    assert r.returncode == 74, r.out
    line = one_error(r.stderr)
    assert re.search(rf"could not write .*w/{re.escape(name)}: no space left on device; free space in .*w or pick "
                     r"another runtime\.work_dir", line), line
    if name == "metrics.jsonl":  # step 1 was saved before the log of step 2 failed: it is kept, intact
        from engine.checkpoint_manager import CheckpointManager
        ckpt = CheckpointManager(work).latest()
        assert ckpt and ckpt.endswith("step_0000001.pth"), os.listdir(work / "checkpoints")
        from engine.checkpoint import load_checkpoint
        assert load_checkpoint(ckpt)["step"] == 1


def test_full_disk_under_tensorboard_ends_the_run_instead_of_blocking(tmp_path, monkeypatch):
    """tensorboardX's writer thread died on ENOSPC and its full queue then blocked add_scalar for ever."""
    pytest.importorskip("tensorboardX")
    import time
    from tensorboardX.record_writer import RecordWriter
    from engine.checkpoint import CheckpointError
    from engine.logger import RunLogger

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    runlog = RunLogger(str(tmp_path), True, True)
    monkeypatch.setattr(RecordWriter, "write", full)  # the disk fills up during the run
    monkeypatch.setattr(RecordWriter, "flush", full)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"could not write .*/tb: no space left on device; free space in "):
        for step in range(200):  # 10 fill the queue of a dead writer thread
            runlog.log("train", step, {"loss": 1.0})
            time.sleep(0.02)
    assert time.monotonic() - start < 30
    runlog.close()


def test_tiny_dev_shm_is_refused_before_the_first_step(tmp_path, capsys, monkeypatch):
    """Docker's 64 MB /dev/shm with data workers: a bus error mid-epoch before; now 74 and one line, nothing written."""
    import shutil
    from tools.train import run
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    real = shutil.disk_usage

    def usage(path):
        if os.fspath(path) == "/dev/shm":
            return real(path)._replace(free=64 * 2**20)
        return real(path)
    monkeypatch.setattr(shutil, "disk_usage", usage)
    monkeypatch.chdir(REPO)
    (tmp_path / "base.yaml").write_text(BASE)
    argv = [str(tmp_path / "base.yaml"), f"runtime.work_dir={tmp_path}/work", "data.workers=2", "data.input_size=224",
            "train.batch_size=64", "eval.batch_size=64", "data.synthetic.train_size=64", "runtime.max_steps=1"]
    assert run(argv) == 74
    line = one_error(capsys.readouterr().err)
    assert re.search(r"/dev/shm has 64\.0 MiB free but the data workers' batches in flight need about 73\.5 MiB "
                     r"\(1 process x data\.workers=2 x data\.prefetch_factor=2 x batches of 64 x 3x224x224 uint8, "
                     r"x2 margin\); lower data\.workers .*--shm-size", line), line
    assert not (tmp_path / "work").exists()
    assert run(argv[:-5] + ["data.workers=0", "runtime.max_steps=1"]) == 0  # no workers: no shared memory needed


def _report_as(rank, line, tmp_path, world=2):
    env = {k: v for k, v in os.environ.items() if k not in ("BLOCKLAB_LAUNCHER", "BLOCKLAB_RUN_DIR")}
    env.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29999",
               TORCHELASTIC_RUN_ID=tmp_path.name, TMPDIR=str(tmp_path), PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-c", f"from engine.relay import report_error; report_error({line!r})"],
                            env=env, stderr=subprocess.PIPE, text=True)


def test_without_the_launcher_a_non_zero_ranks_error_reaches_the_console_once(tmp_path):
    """torchrun/srun without tools/launch.py: only rank 0 used to print; rank 1's own error was lost."""
    from core.watchdog import RUN_DIR_ENV
    assert RUN_DIR_ENV == "BLOCKLAB_RUN_DIR"
    procs = [_report_as(r, "error: cannot read image P: truncated; replace it" if r else "error: lost contact with "
                        "rank 1", tmp_path) for r in (0, 1)]
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert errs[0].strip() == "error: lost contact with rank 1"
    assert errs[1].strip() == "error: [rank 1] cannot read image P: truncated; replace it"
    # the same line from every rank (a refused config): printed once, by one rank
    procs = [_report_as(r, "error: cfg.yaml: unknown key 'train.lrr'", tmp_path) for r in (0, 1, 2)]
    errs = "".join(p.communicate(timeout=60)[1] for p in procs)
    assert errs.count("unknown key 'train.lrr'") == 1, errs


def test_a_damaged_best_pth_is_restored_or_moved_aside_at_start(tmp_path):
    """best.pth with a flipped bit while best.json is intact used to stay until test.sh loaded it."""
    from engine.checkpoint_manager import CheckpointManager
    from engine.trainer import Trainer
    from tests.engine_helpers import tiny_cfg, tiny_model
    from tests.fault_inject import flip_tensor_bit
    work = tmp_path / "w"
    Trainer(tiny_cfg(work, "runtime.keep_last=5"), tiny_model).train()
    ckpt = work / "checkpoints"
    source = CheckpointManager(work).best_source
    good = (ckpt / "best.pth").read_bytes()
    assert good == (ckpt / source).read_bytes()
    flip_tensor_bit(ckpt / "best.pth")
    Trainer(tiny_cfg(work, "runtime.keep_last=5"), tiny_model).train()  # nothing to do: it only checks best.pth
    assert (ckpt / "best.pth").read_bytes() == good, "the damaged best.pth was not restored"
    log = (work / "log.txt").read_text()
    assert re.search(rf"best\.pth was damaged \(checkpoint .*best\.pth fails its integrity check.*\); restored it "
                     rf"from .*{source} \(same metric\)", log), log
    # its source gone as well: moved aside, said in one line; the next better epoch writes a new one
    flip_tensor_bit(ckpt / "best.pth")
    os.remove(ckpt / source)
    Trainer(tiny_cfg(work, "runtime.keep_last=5"), tiny_model).train()
    assert not (ckpt / "best.pth").exists() and (ckpt / "best.pth.damaged").exists()
    assert re.search(rf"best\.pth is damaged \(.*\) and its source \({source}\) is gone or damaged too: moved it to "
                     r"best\.pth\.damaged; the next epoch better than [\d.]+ writes a new best\.pth",
                     (work / "log.txt").read_text())


def test_path_forms_users_type_through_the_scripts(tmp_path):
    """'~' in runtime.work_dir (a literal '~' folder was made in the current directory) and in test.sh's
    CHECKPOINT, a trailing slash (the same run), relative paths from another directory (relative to it)."""
    home, here = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    here.mkdir()
    (tmp_path / "base.yaml").write_text(BASE)
    env = {"HOME": str(home)}
    script = os.path.relpath(os.path.join(REPO, "train.sh"), here)  # e.g. ../../blocklab/train.sh
    from tests.engine_helpers import launch_env
    e = {**launch_env(), **env}

    def run(cmd, *args):
        r = subprocess.run([cmd, *args], cwd=here, env=e, capture_output=True, text=True, timeout=240)
        r.out = r.stdout + r.stderr
        return r
    r = run(script, "../base.yaml", "1", "runtime.work_dir=~/w")
    assert r.returncode == 0, r.out
    assert (home / "w" / "checkpoints" / "best.pth").is_file() and not (here / "~").exists(), os.listdir(here)
    r = run(script, "../base.yaml", "1", "runtime.work_dir=~/w/")  # the same run: nothing left to do
    assert r.returncode == 0 and "nothing to do: this run already finished" in r.out, r.out
    r = run(script, "../base.yaml", "1", f"runtime.work_dir={home}/w//")
    assert r.returncode == 0 and "nothing to do" in r.out, r.out
    r = run(script, "../base.yaml", "1", "runtime.work_dir=rel/w", "runtime.resume_from=~/w/checkpoints/best.pth")
    assert r.returncode == 0, r.out  # relative to the caller's directory; '~' in resume_from
    assert (here / "rel" / "w" / "config.yaml").is_file()
    r = run(os.path.relpath(os.path.join(REPO, "test.sh"), here), "~/w")  # quoted: the shell left the '~'
    assert r.returncode == 0 and "top1" in r.out, r.out
    assert (home / "w" / "test_best.json").is_file(), os.listdir(home / "w")
