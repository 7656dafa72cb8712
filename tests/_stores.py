"""Synthetic caches for tests, built with the store layer's own layout (no teacher).

:func:`write_cache` is the one fixture writer: it creates the layout of
:func:`tcskd.store.layout.create_store` and fills every array, so a fixture
cache has exactly the schema and manifest of one the cache stage builds.
:func:`make_feature_cache` wraps it for the stage-2 tests (features given directly);
``tests/_train_fixtures.make_train_cache`` for the stage-3 tests (features of a fake
teacher, with bases).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from tcskd.store.backends import Store
from tcskd.store.layout import create_store
from tcskd.store.manifest import Manifest
from tcskd.store.paths import RemotePath, as_location
from tcskd.store.registry import cache_key


def write_cache(path: "Path | RemotePath", features: np.ndarray, *, fmt: str = "zarr", chunk_rows: int = 64,
                dtype: str | None = None, labels: np.ndarray | None = None,
                view_params: np.ndarray | None = None, row_ok: np.ndarray | None = None,
                chunk_done: np.ndarray | None = None, complete: bool | None = None,
                identity: dict[str, Any] | None = None, data_spec: str = "synthetic",
                teacher_spec: str = "synthetic", num_classes: int = 0, channels: int | None = None,
                image_size: int | None = None, grid: tuple[int, int] | None = None,
                coords_of: str | None = None, teacher_dim: int | None = None,
                bases: Callable[[Store], None] | None = None, split: str = "train",
                sample_index: np.ndarray | None = None) -> "Path | RemotePath":
    """A cache at ``path`` holding ``features`` [N, V, D] (or [N, D] for one view); returns ``path``.

    ``features`` [N, V, T, D] make a patch cache (``grid`` defaults to a square of T tokens; ``coords_of`` and
    ``teacher_dim`` as in a ``--dim K`` cache).

    ``labels`` default to -1, ``sample_index`` to 0..N-1, ``split`` to train, ``view_params`` 0, ``row_ok`` and ``chunk_done``
    all True; ``complete`` (the manifest's flag) defaults to whether every chunk is done. ``bases(store)``
    writes bases before the cache is marked complete.
    """
    path = as_location(path)
    x = np.asarray(features)
    if x.ndim == 2:
        x = x[:, None, :]
    n, v, d = x.shape[0], x.shape[1], x.shape[-1]
    dense: dict[str, Any] = {}
    if x.ndim == 4:
        side = int(round(x.shape[2] ** 0.5))
        grid = tuple(grid or (side, x.shape[2] // side))
        dense = {"tokens": "patch", "grid": list(grid), "patch": (image_size or 16) / grid[0],
                 "teacher_dim": teacher_dim or d, "coords_of": coords_of}
    dtype = dtype or str(x.dtype)
    if identity is None:
        identity = {"test": path.name, "data": {"spec": data_spec}, "teacher": {"spec": teacher_spec},
                    "split": split, "views": v, "dtype": dtype}
        identity.update({k: dense[k] for k in ("tokens", "grid") if k in dense})
    manifest = Manifest.new(key=cache_key(identity), identity=identity, data_spec=data_spec, split=split,
                            teacher_spec=teacher_spec, n_rows=n, views=v, dim=d, dtype=dtype, chunk_rows=chunk_rows,
                            num_classes=num_classes, channels=channels, image_size=image_size, complete=False,
                            skipped=[], dense_chunks=True, **dense)
    done = np.ones(manifest.n_chunks, bool) if chunk_done is None else np.asarray(chunk_done, bool)
    store = create_store(path, manifest, fmt)
    try:
        store["features"][...] = x.astype(dtype)
        store["labels"][...] = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        store["sample_index"][...] = np.arange(n) if sample_index is None else np.asarray(sample_index, np.int64)
        store["view_params"][...] = (np.zeros((n, v, 5), np.float32) if view_params is None
                                     else np.asarray(view_params, np.float32))
        store["row_ok"][...] = np.ones(n, bool) if row_ok is None else np.asarray(row_ok, bool)
        store["chunk_done"][...] = done
        if bases is not None:
            bases(store)
        store.set_attrs({"complete": bool(done.all()) if complete is None else bool(complete)})
        store.flush()
    finally:
        store.close()
    return path


def make_feature_cache(path: Path, features: np.ndarray, fmt: str = "zarr", chunk_rows: int = 64,
               row_ok: np.ndarray | None = None, chunk_done: np.ndarray | None = None,
               dtype: str | None = None) -> Path:
    """A cache at ``path`` holding ``features`` [N, V, D] (or [N, D] for one view; [N, V, T, D]: a patch cache).

    ``row_ok`` and ``chunk_done`` default to all True; ``dtype`` defaults to the
    features' own (float16 or float32). Returns ``path``.
    """
    return write_cache(path, features, fmt=fmt, chunk_rows=chunk_rows, row_ok=row_ok, chunk_done=chunk_done,
                       dtype=dtype)


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


def map_teacher(folder: Path, dim: int = 8, stride: int = 4) -> str:
    """A torchscript teacher spec whose module returns a B x ``dim`` x S/stride x S/stride map (a tiny dense teacher:
    its tokens are the map, its global feature the map's mean; tcskd.teachers)."""
    import torch
    import torch.nn as nn

    class TinyMap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, dim, 3, stride=stride, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x)) + 0.1 * self.conv(x)

    path = Path(folder) / f"map-{dim}-{stride}.pt"
    if not path.is_file():
        torch.manual_seed(dim * 100 + stride)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.script(TinyMap().eval()).save(str(path))
    return f"torchscript:{path}"
