"""torch.distributed, when the process was started by ``torchrun``; a no-op otherwise.

``torchrun --nproc-per-node N -m tcskd <stage> ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK; every stage calls :func:`init` and then uses the helpers below.
NCCL is the backend on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device | None = None) -> None:
    """Join the process group once (NCCL on CUDA, gloo otherwise)."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=_dt.timedelta(minutes=60))
    log.info("rank %d of %d joined (%s)", rank(), world(), backend)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (e.g. an error message or a path)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (float64 stays float64 under gloo and NCCL)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def device_for_rank(device: torch.device) -> torch.device:
    """Each rank takes its own GPU (LOCAL_RANK); the CPU is shared."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", local_rank())
    return device


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
