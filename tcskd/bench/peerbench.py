"""``tcskd bench``'s ``peers`` section: the time of one epoch of the same job in independently written
distillation code (tcskd.bench.peers: torchdistill and timm), beside tcskd's own training figures.

Each arm runs ``python -m tcskd.bench.peers`` in a process of its own on the bench's main cache (its data,
teacher and rows; the teacher runs online in the FitNet arms), with the bench's student, batch, threads and
workers, for 1 warm-up + ``epochs`` timed epochs and one seed; its ``final.json`` gives the seconds per epoch
(the median of the timed epochs), img/s, peak memory and, on the CPU, the peak over the RSS after imports.
Without the ``peers`` extra (torchdistill and timm) the section is skipped with one line.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tcskd.bench.env import REPO_ROOT
from tcskd.bench.measure import ratio

log = logging.getLogger(__name__)

#: The frameworks the peer arms need (the ``peers`` extra).
FRAMEWORKS = ("torchdistill", "timm")


def missing_frameworks() -> list[str]:
    """The peer frameworks that are not installed."""
    return [m for m in FRAMEWORKS if importlib.util.find_spec(m) is None]


def _arm_command(arm: str, cache: str, student: str, batch: int, epochs: int, device: torch.device,
                 workers: int | None, threads: int | None, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "tcskd.bench.peers", "--arm", arm, "--cache", cache, "--student", student,
           "--batch-size", str(batch), "--epochs", str(epochs + 1), "--val-frac", "0", "--eval-every",
           str(10 ** 6), "--device", device.type, "--seed", "0", "--out", str(out)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def bench_peers(cache: str, arms: tuple[str, ...], student: str, batch: int, epochs: int, device: torch.device,
                workdir: Path, workers: int | None = None, threads: int | None = None, timeout: float = 600.0,
                train: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each arm for 1 + ``epochs`` epochs on ``cache``; with ``train`` (the bench's train section) each arm's
    seconds per epoch over tcskd's ``tcs`` and ``ce``."""
    from tcskd.bench.peers.glue import peer_versions

    missing = missing_frameworks()
    if missing:
        return {"skipped": f"{' and '.join(missing)} not installed: pip install 'tcskd[peers]'"}
    out: dict[str, Any] = {"versions": peer_versions(), "epochs_measured": epochs, "arms": {}, "errors": {}}
    ours = {m: (train or {}).get(m, {}).get("epoch_seconds", {}).get("median") for m in ("tcs", "ce")}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    for arm in arms:
        run_dir = workdir / f"peer-{arm}"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(_arm_command(arm, cache, student, batch, epochs, device, workers, threads, run_dir),
                                  capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO_ROOT))
        except subprocess.TimeoutExpired:
            out["errors"][arm] = f"timed out after {timeout:.0f} s"
            continue
        final = run_dir / "final.json"
        if proc.returncode != 0 or not final.is_file():
            tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            log.error("bench: peer arm %s failed: %s", arm, tail)
            out["errors"][arm] = tail
            continue
        f = json.loads(final.read_text())
        out["arms"][arm] = {
            "framework": f.get("framework"), "seconds_per_epoch": f["seconds_per_epoch"],
            "epoch_seconds": f["epoch_seconds"], "img_per_s": f["img_per_s"], "peak_mem_bytes": f["peak_mem_bytes"],
            "peak_mem_over_imports_bytes": f.get("peak_mem_over_imports_bytes"), "threads": f.get("threads"),
            "wall_s": time.perf_counter() - t0,
            "per_epoch_vs_tcs": ratio(f["seconds_per_epoch"], ours["tcs"]),
            "per_epoch_vs_ce": ratio(f["seconds_per_epoch"], ours["ce"])}
        shutil.rmtree(run_dir, ignore_errors=True)
    return out
