"""Small helpers every benchmark shares: device syncs, the statistics of repeats, a linear fit."""

from __future__ import annotations

import gc
from typing import Any

import numpy as np
import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only), so that a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Collect garbage and return cached CUDA memory between measurements."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def stats(runs: list[float]) -> dict[str, Any]:
    """median, min, max and every run (rounded) of a figure's repeats."""
    a = np.asarray(runs, dtype=np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "runs": [round(float(v), 6) for v in a]}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def linear_fit(sizes: list[int], seconds: list[float]) -> dict[str, Any] | None:
    """seconds = fixed_s + rows / marginal_rows_per_s fitted over the sizes; with three sizes also the growth
    of the per-row cost from the first step to the second (``cost_growth``, 1 when linear)."""
    if len(sizes) < 2:
        return None
    b, a = np.polyfit(np.asarray(sizes, float), np.asarray(seconds, float), 1)
    pred = a + b * np.asarray(sizes, float)
    out = {"fixed_s": float(a), "marginal_rows_per_s": float(1.0 / b) if b > 0 else None,
           "max_rel_residual": float(np.max(np.abs(pred - seconds) / np.asarray(seconds)))}
    if len(sizes) >= 3:
        c1 = (seconds[1] - seconds[0]) / (sizes[1] - sizes[0])
        c2 = (seconds[2] - seconds[1]) / (sizes[2] - sizes[1])
        out["cost_growth"] = float(c2 / c1) if c1 > 0 else None
    return out
