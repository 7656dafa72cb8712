"""The basis stage's figures: ``fit_basis`` against one plain read of ``features`` and against its streamed
moments alone, per store size, with the parts of the fit that ``fit_basis`` reports in its ``timings``."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcskd.bench.measure import linear_fit, stats, sync
from tcskd.store.backends import open_store
from tcskd.store.chunks import iter_feature_chunks
from tcskd.subspace.fit import BasisConfig, fit_basis
from tcskd.store.moments import stream_moments

#: The JSON's names (``basis_parts_s``) of the parts ``fit_basis`` times: the streamed pass that sums the
#: moments, the decomposition, writing the basis, the scree plot.
PARTS = {"read": "moments", "compute": "decomposition", "write": "write_basis", "plot": "plot"}


def read_features(path: str | Path) -> int:
    """One plain sequential read of ``features``, chunk by chunk (its own chunk rows); returns the bytes read."""
    with open_store(Path(path)) as s:
        every = np.ones(int(s["features"].shape[0]), bool)  # the row mask is not read
        return sum(c.x.nbytes for c in iter_feature_chunks(s, desc="read", ok=every, progress=False))


def _feature_dim(path: str) -> int:
    with open_store(Path(path)) as s:
        return int(s["features"].shape[2])


def _one_size(path: str, k: int, device: torch.device, repeats: int, plot: bool) -> dict[str, Any]:
    """``repeats`` x (a plain read, the streamed moments alone, ``fit_basis``) on one store."""
    reads, fits, moms, parts = [], [], [], []
    nbytes = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        nbytes = read_features(path)
        reads.append(time.perf_counter() - t0)
        with open_store(Path(path)) as s:
            sync(device)
            t0 = time.perf_counter()
            stream_moments(s, "0", device)
            sync(device)
            moms.append(time.perf_counter() - t0)
        sync(device)
        t0 = time.perf_counter()
        summary = fit_basis(BasisConfig(cache=path, name="pca", dim=k, device=device.type, plot=plot))
        sync(device)
        fits.append(time.perf_counter() - t0)
        parts.append(summary["timings"])
    rs, fs, ms = stats(reads), stats(fits), stats(moms)
    breakdown = {PARTS[n]: float(np.median([p[n] for p in parts])) for n in PARTS}
    breakdown["other"] = fs["median"] - sum(breakdown.values())
    return {"bytes": nbytes, "read_s": rs, "moments_s": ms, "basis_s": fs, "basis_vs_read": fs["median"] / rs["median"],
            "basis_parts_s": breakdown, "read_mb_per_s": nbytes / rs["median"] / 1e6}


def bench_basis(paths: dict[int, str], dim: int, device: torch.device, repeats: int, warmup: int,
                tiled: set[int] = frozenset(), plot: bool = True) -> dict[str, Any]:
    """``fit_basis`` (PCA, ``dim`` coordinates, as ``tcskd basis --dim K``) versus a plain read, per cache size.

    ``plot``: draw the scree plot as ``tcskd basis`` does, where matplotlib is installed. The last fit of
    every cache leaves the basis ``pca`` in it (the train benchmark uses it)."""
    plot = plot and importlib.util.find_spec("matplotlib") is not None
    sizes = sorted(paths)
    for _ in range(warmup):
        read_features(paths[sizes[0]])
        k0 = min(dim, _feature_dim(paths[sizes[0]]))
        fit_basis(BasisConfig(cache=paths[sizes[0]], name="pca", dim=k0, device=device.type, plot=plot))
    rows_out = []
    for rows in sizes:
        d = _feature_dim(paths[rows])
        k = min(dim, d)
        one = _one_size(paths[rows], k, device, repeats, plot)
        rows_out.append({"rows": rows, "tiled": rows in tiled, "dim": d, "k": k, "bytes": one["bytes"],
                         "read_s": one["read_s"], "moments_s": one["moments_s"], "basis_s": one["basis_s"],
                         "basis_vs_read": one["basis_vs_read"], "basis_parts_s": one["basis_parts_s"],
                         "read_mb_per_s": one["read_mb_per_s"]})
    real = [r for r in rows_out if not r["tiled"]]
    fit_read = linear_fit([r["rows"] for r in real], [r["read_s"]["median"] for r in real])
    fit_basis_ = linear_fit([r["rows"] for r in real], [r["basis_s"]["median"] for r in real])
    return {"sizes": rows_out, "plot_drawn": plot, "linear_fit_read": fit_read, "linear_fit_basis": fit_basis_}
