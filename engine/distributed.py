"""Process-group setup from launcher (tools/launch.py, torchrun) or SLURM variables, and collective helpers.

tools/launch.py and torchrun set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``;
under ``srun`` without torchrun, ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``
are used and ``MASTER_ADDR`` defaults to the first host of ``SLURM_NODELIST``.
A single process with neither set runs without a process group. The backend is
NCCL when the device is CUDA and gloo on CPU, so two CPU processes exercise the
same code path as a GPU run.
"""
import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.fields import ConfigError


class PeerLost(RuntimeError):
    """Another process of the run died or never joined (exit 76): nothing this process can save."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def _env_int(*names):
    for n in names:
        if os.environ.get(n, "") != "":
            return int(os.environ[n])
    return None


def _slurm_master_addr():
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return nodes.split(",")[0] if "[" not in nodes else None


def read_env():
    """(rank, world_size, local_rank) from torchrun's variables, else SLURM's, else (0, 1, 0)."""
    if _env_int("WORLD_SIZE") is not None:
        return _env_int("RANK") or 0, _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK") or 0
    if _env_int("SLURM_NTASKS") is not None and _env_int("SLURM_PROCID") is not None:
        rank, world = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
        local = _env_int("SLURM_LOCALID") or 0
        if world > 1:
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("WORLD_SIZE", str(world))
            os.environ.setdefault("LOCAL_RANK", str(local))
            if "MASTER_ADDR" not in os.environ:
                addr = _slurm_master_addr()
                if addr is None:
                    raise ConfigError("SLURM run without MASTER_ADDR and scontrol is unavailable; "
                                      "export MASTER_ADDR=<first node> (tools/slurm_train.sh does)")
                os.environ["MASTER_ADDR"] = addr
            os.environ.setdefault("MASTER_PORT", str(20000 + (_env_int("SLURM_JOB_ID") or 0) % 20000))
        return rank, world, local
    return 0, 1, 0


def rendezvous(rank, world, timeout_s):
    """The TCP store at MASTER_ADDR:MASTER_PORT once all ``world`` processes joined, else :class:`PeerLost`."""
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    try:
        return dist.TCPStore(addr, port, world, is_master=rank == 0, wait_for_workers=True,
                             timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, TimeoutError) as e:
        raise PeerLost(f"not all {world} processes joined at {addr}:{port} within dist.rdzv_timeout_s={timeout_s} "
                       f"({str(e).splitlines()[0][:120]}); start the same command on every node (same NNODES, "
                       "MASTER_ADDR, MASTER_PORT; NODE_RANK 0..NNODES-1) or raise dist.rdzv_timeout_s") from None


# messages of gloo/NCCL/store errors caused by a process that died (not by this one)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted", "Socket Timeout")


def as_peer_lost(exc):
    """A :class:`PeerLost` when ``exc`` (raised in a multi-process run) came from another process's death."""
    if isinstance(exc, PeerLost):
        return exc
    if (_env_int("WORLD_SIZE") or 1) < 2:
        return None
    if isinstance(exc, getattr(dist, "DistError", ())) or any(m in str(exc) for m in _PEER_GONE):
        return PeerLost(f"lost contact with another process of the run ({str(exc).splitlines()[0][:120]}); see "
                        "its output for why; run the same command to resume from the last checkpoint")
    return None


def pick_device(runtime_device, local_rank):
    if runtime_device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda but no CUDA device is visible; use runtime.device=cpu")
    if runtime_device != "cpu" and torch.cuda.is_available():
        n = torch.cuda.device_count()
        torch.cuda.set_device(local_rank % n)
        return torch.device("cuda", local_rank % n)
    return torch.device("cpu")


def init_distributed(dist_cfg, runtime_device="auto"):
    """Join the process group described by the environment; returns a :class:`DistInfo`."""
    rank, world, local = read_env()
    device = pick_device(runtime_device, local)
    backend = dist_cfg["backend"]
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo on CPU")
    if world > 1 and not dist.is_initialized():
        kwargs = dict(backend=backend, rank=rank, world_size=world,
                      timeout=datetime.timedelta(minutes=dist_cfg["timeout_min"]))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun hosts the store
            kwargs["init_method"] = "env://"
        else:
            kwargs["store"] = rendezvous(rank, world, dist_cfg.get("rdzv_timeout_s", 300))
        if device.type == "cuda":
            kwargs["device_id"] = device
        try:
            dist.init_process_group(**kwargs)
        except TypeError:
            kwargs.pop("device_id", None)
            dist.init_process_group(**kwargs)
    return DistInfo(rank, world, local, device, backend if world > 1 else "")


def launch_rank():
    """This process's rank as its launcher set it, also before (or without) a process group."""
    if is_dist():
        return dist.get_rank()
    return _env_int("RANK", "SLURM_PROCID") or 0


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main():
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum ``tensor`` in place over all ranks (no-op in a single process)."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src=0):
    """``obj`` from rank ``src`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module, src=0):
    """Copy ``module``'s buffers (BatchNorm running statistics, ...) from rank ``src`` to every rank.

    DDP keeps parameters in sync but each rank's last forward updated its own BN
    statistics; evaluation shards must all use the same model.
    """
    if not is_dist():
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=src)


def destroy():
    if is_dist():
        try:
            dist.destroy_process_group()
        except RuntimeError:  # a peer died: there is nothing left to tear down cleanly, and the reason is known
            pass
