"""Dense caches against global ones: the cache stage (img/s and tokens/s of ``build_cache`` for global features,
raw patch tokens and ``--dim K`` coordinates, with bytes per image) and the basis stage (``fit_basis`` on a global
cache and on a raw patch cache: its read and fit throughput in samples, i.e. tokens, per second).

Every figure comes from what the stages return (``CacheResult.timings``, ``fit_basis(...)["timings"]``) and the
stores themselves (``size_bytes``), as in :mod:`tcskd.bench.cache` and :mod:`tcskd.bench.basis`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tcskd.bench.basis import read_features
from tcskd.bench.cache import timed_build
from tcskd.bench.measure import stats, sync
from tcskd.cache.build import CacheConfig
from tcskd.errors import NoTokensError
from tcskd.store.backends import open_store
from tcskd.store.layout import bytes_per_image
from tcskd.store.manifest import Manifest
from tcskd.subspace.fit import BasisConfig, fit_basis

#: The cache configurations compared: (name, CacheConfig options besides ``dim``).
CONFIGS = (("global", {"tokens": "global"}), ("patch", {"tokens": "patch"}), ("coords", {"tokens": "patch"}))


def _features_on_disk(path: Path) -> int | None:
    """Bytes of the ``features`` array's files of a Zarr directory store (None for another store)."""
    folder = Path(path) / "features"
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else None


def _build(cfg: CacheConfig, device: torch.device) -> tuple[float, Any, Manifest, int]:
    """(wall seconds, CacheResult, manifest, bytes on disk) of one ``build_cache`` that computes every row."""
    secs, res = timed_build(cfg, device)
    with open_store(res.path) as s:
        m, size = Manifest.read(s), s.size_bytes()
    return secs, res, m, size


def bench_dense_cache(teacher_spec: str, data: str, image_size: int | None, rows: int, batch: int, workers: int,
                      chunk_rows: int, dim: int, device: torch.device, repeats: int, workdir: Path,
                      keep: bool = True, warmup: int = 1) -> dict[str, Any]:
    """``build_cache`` of ``rows`` rows as global features, raw patch tokens and their first ``dim`` coordinates
    (the basis fitted on a sample of every row): img/s, tokens/s, bytes per image (uncompressed and on disk), and
    the parts of the time (``timings_s``; ``basis``: the sample pass of ``--dim``). With ``keep`` the last global
    and raw patch caches stay (``kept``) for :func:`bench_dense_basis`. ``warmup`` small patch caches first (the
    dataset read, the teacher's first batches)."""
    base = dict(data=data, teacher=teacher_spec, split="train", image_size=image_size, batch_size=batch,
                limit=rows, device=device.type, workers=workers, chunk_rows=chunk_rows, basis_sample=rows)
    for w in range(warmup):
        root = workdir / f"warm-{w}"
        _build(CacheConfig(**{**base, "limit": min(rows, batch)}, tokens="patch", cache_root=str(root)), device)
        shutil.rmtree(root, ignore_errors=True)
    out: list[dict[str, Any]] = []
    kept: dict[str, str] = {}
    for name, opts in CONFIGS:
        if out:  # K at most the teacher's width (known from the global cache)
            dim = min(dim, out[0]["dim"])
        secs, parts, last = [], [], None
        for r in range(repeats):
            root = workdir / f"dense-{name}-{r}"
            cfg = CacheConfig(**base, **opts, cache_root=str(root), dim=dim if name == "coords" else None)
            s, res, m, size = _build(cfg, device)
            feats = _features_on_disk(res.path)
            secs.append(s)
            parts.append(res.timings)
            if keep and r == repeats - 1 and name != "coords":
                kept[name] = str(res.path)
            else:
                shutil.rmtree(root, ignore_errors=True)
            last = (m, size, feats)
        m, size, feats = last
        st = stats(secs)
        tokens = m.n_tokens * int(m.views)
        timings = {n: float(np.median([p.get(n, 0.0) for p in parts])) for n in parts[0]}
        # --dim's sample pass runs the teacher over every row here (basis_sample = rows); at scale the sample is a
        # small share of the data, so the pass that stores the coordinates is also given on its own.
        store_pass = st["median"] - timings.get("basis", 0.0)
        out.append({"config": name, "tokens_per_image": tokens, "grid": m.grid, "dim": int(m.dim),
                    "teacher_dim": int(m.feature_dim), "dtype": m.dtype, "seconds": st,
                    "img_per_s": rows / st["median"], "tokens_per_s": rows * tokens / st["median"],
                    "bytes_per_image": bytes_per_image(int(m.dim), m.n_tokens, str(m.dtype), int(m.views)),
                    "disk_bytes_per_image": size / rows,
                    "features_disk_bytes_per_image": None if feats is None else feats / rows,
                    "img_per_s_without_sample": rows / store_pass if name == "coords" and store_pass > 0 else None,
                    "timings_s": timings})
    return {"rows": rows, "batch": batch, "k": dim, "configs": out, "kept": kept}


def bench_dense_basis(paths: dict[str, str], dim: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """``fit_basis`` (PCA, ``dim`` coordinates) on the global and the raw patch cache: a plain read of ``features``
    and the fit, in MB/s and samples/s (a patch cache: every token is a sample)."""
    out = []
    for name, path in paths.items():
        reads, fits, samples, nbytes = [], [], 0, 0
        with open_store(Path(path)) as s:
            k = min(dim, int(s["features"].shape[-1]))
        for _ in range(repeats):
            t0 = time.perf_counter()
            nbytes = read_features(path)
            reads.append(time.perf_counter() - t0)
            sync(device)
            t0 = time.perf_counter()
            summary = fit_basis(BasisConfig(cache=path, name="bench", dim=k, device=device.type, view="all",
                                            plot=False))
            sync(device)
            fits.append(time.perf_counter() - t0)
            samples = int(summary["samples"])
        rs, fs = stats(reads), stats(fits)
        out.append({"config": name, "k": k, "samples": samples, "bytes": nbytes, "read_s": rs, "basis_s": fs,
                    "read_mb_per_s": nbytes / rs["median"] / 1e6, "fit_mb_per_s": nbytes / fs["median"] / 1e6,
                    "fit_samples_per_s": samples / fs["median"]})
    return {"configs": out}


def bench_dense(teacher_spec: str, data: str, image_size: int | None, rows: int, batch: int, workers: int,
                chunk_rows: int, dim: int, device: torch.device, repeats: int, workdir: Path,
                warmup: int = 1) -> dict[str, Any]:
    """Both dense sections for one teacher; ``skipped`` (with the reason) when the teacher has no token grid."""
    try:
        cache = bench_dense_cache(teacher_spec, data, image_size, rows, batch, workers, chunk_rows, dim, device,
                                  repeats, workdir, warmup=warmup)
    except NoTokensError as e:
        shutil.rmtree(workdir, ignore_errors=True)
        return {"skipped": str(e)}
    k = cache["k"]
    kept = cache.pop("kept")
    try:
        basis = bench_dense_basis(kept, k, device, repeats)
    finally:
        for p in kept.values():
            shutil.rmtree(Path(p).parent, ignore_errors=True)
    return {"cache": cache, "basis": basis}
