"""Two CPU processes over gloo: the real distributed path of the trainer.

* ranks end with identical weights; evaluation counts each of 19 images once;
* one rank's stop request stops both at the same step; resuming with 2 processes
  ends where the uninterrupted 2-process run ends;
* with SyncBN, 2 processes x 4 images equal 1 process x 8 images to float tolerance.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.engine_helpers import assert_same, tiny_cfg, tiny_model, weights


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, work_dir, out, overrides, stop_rank_at):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from engine import distributed as du
    from engine.trainer import Trainer
    t = Trainer(tiny_cfg(work_dir, *overrides), model_fn=tiny_model)
    if stop_rank_at is not None and rank == stop_rank_at[0]:
        orig = t.optimizer_step

        def step():
            orig()
            if t.step + 1 == stop_rank_at[1]:
                t.stop.request()
        t.optimizer_step = step
    res = t.train()
    torch.save({"weights": weights(t.model), "metrics": res["metrics"], "status": res["status"],
                "step": t.step, "world": t.dist.world_size, "backend": t.dist.backend},
               os.path.join(out, f"rank{rank}.pt"))
    du.destroy()


def spawn(tmp_path, name, overrides=(), stop_rank_at=None, world=2):
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path / f"work_{name}"), str(out),
                                      tuple(overrides), stop_rank_at),
                       nprocs=world, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)


def test_two_ranks_identical_weights_exact_eval_and_resume(tmp_path):
    full = spawn(tmp_path, "full")
    assert [r["backend"] for r in full] == ["gloo", "gloo"] and full[0]["step"] == 8  # 2 epochs x 32 images / 8
    assert_same(full[0]["weights"], full[1]["weights"])
    assert full[0]["metrics"]["count"] == full[1]["metrics"]["count"] == 19  # 19 = 10 + 9 images, none twice
    assert {k: v for k, v in full[0]["metrics"].items() if k != "time_s"} == \
        {k: v for k, v in full[1]["metrics"].items() if k != "time_s"}

    # rank 1 alone asks to stop in its 3rd step: both ranks stop at the same step and save
    stopped = spawn(tmp_path, "part", stop_rank_at=(1, 3))
    assert [r["status"] for r in stopped] == ["preempted", "preempted"]
    assert stopped[0]["step"] == stopped[1]["step"] in (3, 4)
    ckpts = os.listdir(tmp_path / "work_part" / "checkpoints")
    assert f"step_{stopped[0]['step']:07d}.pth" in ckpts
    resumed = spawn(tmp_path, "part")
    assert resumed[0]["status"] == "done" and resumed[0]["step"] == 8
    assert_same(resumed[0]["weights"], resumed[1]["weights"])
    assert_same(resumed[0]["weights"], full[0]["weights"])


def test_syncbn_two_processes_equal_one_process(tmp_path):
    from engine.trainer import Trainer
    over = ("train.sync_bn=true", "train.epochs=1", "eval.interval=0", "eval.final=false")
    two = spawn(tmp_path, "sync", over)
    assert_same(two[0]["weights"], two[1]["weights"])
    one = Trainer(tiny_cfg(tmp_path / "one", *over), model_fn=tiny_model)
    one.train()
    assert_same(weights(one.model), two[0]["weights"], atol=1e-5, rtol=1e-4)
    # without SyncBN each rank normalises its own 4 images: the runs differ
    plain = spawn(tmp_path, "plain", ("train.epochs=1", "eval.interval=0", "eval.final=false"))
    diff = max((plain[0]["weights"][k] - two[0]["weights"][k]).abs().max().item()
               for k in plain[0]["weights"] if plain[0]["weights"][k].is_floating_point())
    assert diff > 1e-4


def test_ranks_from_torchrun_and_slurm_variables(monkeypatch):
    from core.fields import ConfigError
    from engine.distributed import read_env
    monkeypatch.setattr(os, "environ", {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert read_env() == (3, 8, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "123457",
             "SLURM_NODELIST": "gpu[01-02]", "PATH": "/nonexistent"}  # no scontrol on PATH
    monkeypatch.setattr(os, "environ", dict(slurm))
    with pytest.raises(ConfigError, match="export MASTER_ADDR"):
        read_env()
    env = dict(slurm, MASTER_ADDR="gpu01")
    monkeypatch.setattr(os, "environ", env)
    assert read_env() == (5, 16, 5)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("5", "16", "5", "23457")
    monkeypatch.setattr(os, "environ", {})
    assert read_env() == (0, 1, 0)
