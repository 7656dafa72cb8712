"""Synthetic feature stores for tests (built directly with the store API, no teacher)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tcskd import SCHEMA_VERSION
from tcskd.cache.registry import cache_key
from tcskd.cache.store import open_store


def make_store(path: Path, features: np.ndarray, fmt: str = "zarr", chunk_rows: int = 64,
               row_ok: np.ndarray | None = None, chunk_done: np.ndarray | None = None,
               dtype: str | None = None) -> Path:
    """A cache at ``path`` holding ``features`` [N, V, D] (or [N, D] for one view).

    ``row_ok`` and ``chunk_done`` default to all True; ``dtype`` defaults to the
    features' own (float16 or float32). Returns ``path``.
    """
    path = Path(path)
    x = np.asarray(features)
    if x.ndim == 2:
        x = x[:, None, :]
    n, v, d = x.shape
    dtype = dtype or str(x.dtype)
    n_chunks = -(-n // chunk_rows)
    store = open_store(path, "a", fmt)
    try:
        identity = {"test": path.name, "data": {"spec": "synthetic"}, "teacher": {"spec": "synthetic"},
                    "split": "train", "views": v, "dtype": dtype}
        store.set_attrs({
            "schema_version": SCHEMA_VERSION, "key": cache_key(identity), "identity": identity,
            "data_spec": "synthetic", "split": "train", "teacher_spec": "synthetic",
            "n_rows": n, "views": v, "dim": d, "dtype": dtype, "chunk_rows": chunk_rows,
            "num_classes": 0, "complete": False, "skipped": [],
        })
        feats = store.create("features", (n, v, d), dtype, (chunk_rows, v, d), fill_value=0)
        feats[...] = x.astype(dtype)
        store.create("labels", (n,), "int64", (chunk_rows,), fill_value=-1)
        store.create("sample_index", (n,), "int64", (chunk_rows,), fill_value=-1)[...] = np.arange(n)
        store.create("view_params", (n, v, 5), "float32", (chunk_rows, v, 5), fill_value=0)
        ok = np.ones(n, bool) if row_ok is None else np.asarray(row_ok, bool)
        store.create("row_ok", (n,), "bool", (chunk_rows,), fill_value=False)[...] = ok
        done = np.ones(n_chunks, bool) if chunk_done is None else np.asarray(chunk_done, bool)
        store.create("chunk_done", (n_chunks,), "bool", (1,), fill_value=False, compress=False)[...] = done
        store.require_group("bases")
        store.set_attrs({"complete": bool(done.all())})
        store.flush()
    finally:
        store.close()
    return path


def low_rank_features(n: int = 600, d: int = 48, rank: int = 6, noise: float = 0.01, views: int = 1,
                      seed: int = 0, offset: float = 3.0) -> np.ndarray:
    """[n, views, d] float32: a rank-``rank`` signal with distinct scales, a mean offset, small noise."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, rank)))[0].T           # rank x d orthonormal
    scales = np.linspace(3.0, 0.5, rank)
    z = rng.normal(size=(n, views, rank)) * scales
    mean = offset + rng.normal(size=d)
    x = z @ basis + mean + noise * rng.normal(size=(n, views, d))
    return x.astype(np.float32)
