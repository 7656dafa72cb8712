"""Where a benchmark ran: the device's name, the environment (versions, git, load), a threads probe, memory."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tcskd
from tcskd.device import peak_memory_bytes, proc_status_bytes
from tcskd.store.manifest import git_sha

REPO_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (/proc/cpuinfo)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return name or platform.machine() or "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    """Date, device, cores and threads, platform, versions (without importing the packages), git, load."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": device_name(device), "cpu": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "tcskd": tcskd.__version__, "git_sha": git_sha(), "torch": torch.__version__, "numpy": np.__version__,
    }
    st = _git("status", "--porcelain", "--untracked-files=no")
    env["git_dirty"] = bool(st.stdout.strip()) if st is not None and st.returncode == 0 else None
    for mod in ("zarr", "h5py", "numcodecs", "transformers", "torchvision", "faiss-cpu", "matplotlib"):
        try:
            env[mod] = version(mod)  # without importing it
        except PackageNotFoundError:
            env[mod] = None
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, gpu_memory_gb=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}")
    return env


def threads_probe(reps: int = 10) -> dict[str, Any] | None:
    """A small convolution with torch's current intra-op threads and with one thread (CPU only).

    On a machine whose cores other processes keep busy, every parallel region waits for
    a descheduled thread: one thread can then be many times faster than several."""
    n = torch.get_num_threads()
    if n <= 1:
        return None
    x, w = torch.randn(8, 32, 32, 32), torch.randn(32, 32, 3, 3)

    def ms(threads: int) -> float:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for _ in range(2):
                torch.nn.functional.conv2d(x, w, padding=1)
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.conv2d(x, w, padding=1)
        return 1e3 * (time.perf_counter() - t0) / reps

    try:
        many, one = ms(n), ms(1)
    finally:
        torch.set_num_threads(n)
    return {"threads": n, "conv_ms": round(many, 3), "one_thread_conv_ms": round(one, 3),
            "one_thread_faster": one < many}


def process_rss() -> int | None:
    """This process's resident set size now (Linux), else None."""
    return proc_status_bytes("VmRSS")


def process_peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM on Linux; see tcskd.device)."""
    return peak_memory_bytes(torch.device("cpu"))
