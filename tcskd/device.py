"""The one ``device`` argument every stage takes, and what follows from it."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from typing import ContextManager

import torch

from tcskd.errors import TcskdError

#: The choices of every ``--device`` option.
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TcskdError("--device cuda was asked for but no CUDA device is available")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise TcskdError(f"unknown device '{name}' (choose auto, cpu or cuda)")


def autocast(device: torch.device, enabled: bool = True) -> ContextManager:
    """bf16 autocast on CUDA; a null context on the CPU."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA max allocated on a GPU, else this process's peak resident set size.

    On Linux the peak comes from VmHWM: ``ru_maxrss`` survives fork and exec,
    so a process started from a large parent would report the parent's peak.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (e.g. VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def set_threads(threads: int | None) -> None:
    """CPU threads for torch's intra-op work (None: $TCSKD_THREADS, else torch's default)."""
    if threads is None:
        env = os.environ.get("TCSKD_THREADS")
        if not env:
            return
        try:
            threads = int(env)
        except ValueError:
            raise TcskdError(f"TCSKD_THREADS must be a whole number, not '{env}'") from None
    if threads < 1:
        raise TcskdError(f"--threads must be >= 1 (got {threads})")
    torch.set_num_threads(threads)


#: The most DataLoader workers ``auto`` starts (beyond this, decoding rarely keeps up with anything else).
MAX_AUTO_WORKERS = 16


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, which a batch scheduler or taskset narrows;
    ``os.cpu_count()`` where the platform has no affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(workers: int | str | None, option: str = "--workers") -> int:
    """DataLoader worker processes for ``--workers``: a whole number >= 0 as given, or ``auto`` (None too): one
    less than the usable cores (the main process feeds the device), at most :data:`MAX_AUTO_WORKERS`, at
    least 0 (1 on a 2-core machine). Under torchrun the cores are shared by the node's processes
    (``LOCAL_WORLD_SIZE``): each gets its share. TcskdError (one line) for anything else."""
    if workers is None or workers == "auto":
        local = os.environ.get("LOCAL_WORLD_SIZE", "1")
        share = usable_cores() // max(1, int(local) if local.isdigit() else 1)
        return max(0, min(MAX_AUTO_WORKERS, share - 1))
    if isinstance(workers, str) and workers.strip().lstrip("+-").isdigit():
        workers = int(workers)
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise TcskdError(f"{option} must be auto or a whole number >= 0 (got {workers!r})")
    if workers < 0:
        raise TcskdError(f"{option} must be >= 0 (got {workers})")
    return workers
