"""The one ``device`` argument every stage takes, and what follows from it."""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import ContextManager

import torch

from tcskd.errors import TcskdError

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
    """CUDA max allocated on a GPU, else this process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
