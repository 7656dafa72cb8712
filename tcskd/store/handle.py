"""``open_cache``: a cache by key or path, checked to a level of integrity, as a typed handle.

The stages open caches through it (the basis fit, training, ``tcskd eval``,
the cache stage's hit test), so every reader makes the same checks
(:mod:`tcskd.store.integrity`) and reads rows the same way
(:mod:`tcskd.store.chunks`). It is also the Python API's reader
(``tcskd.open_cache``): ``features``, ``labels``, ``row_ok``, ``sample_index``,
``view_params``, ``basis`` and ``coords`` return numpy arrays as stored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tcskd.store.backends import Store, open_store
from tcskd.errors import StoreError
from tcskd.store.bases import Basis, load_basis
from tcskd.store.chunks import FeatureChunk, iter_feature_chunks, read_chunk_rows, row_mask
from tcskd.store.integrity import first_problem, require
from tcskd.store.layout import ROW_ARRAYS
from tcskd.store.manifest import Manifest
from tcskd.store.paths import RemotePath
from tcskd.store.registry import resolve_cache

log = logging.getLogger(__name__)


class Cache:
    """An open cache: its store, its manifest and typed readers of its rows. Close it (or use ``with``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.manifest = Manifest.read(store)

    @property
    def path(self) -> "Path | RemotePath":
        return self.store.path

    @property
    def format(self) -> str:
        return self.store.format

    @property
    def n(self) -> int:
        """Rows (the length of ``features``)."""
        return int(self.store["features"].shape[0])

    @property
    def views(self) -> int:
        return int(self.store["features"].shape[1])

    @property
    def dim(self) -> int:
        """Feature dimension D (the stored width: K when the cache holds coordinates, Manifest.coords_of)."""
        return int(self.store["features"].shape[-1])

    @property
    def dense(self) -> bool:
        """Whether the cache holds token grids (``features`` N x V x T x D; Manifest.tokens)."""
        return self.manifest.dense

    @property
    def grid(self) -> tuple[int, int] | None:
        """(Gh, Gw) tokens per view of a dense cache, None for a global one."""
        return (int(self.manifest.grid[0]), int(self.manifest.grid[1])) if self.dense else None

    @property
    def chunk_rows(self) -> int:
        """Rows per stored chunk."""
        return read_chunk_rows(self.store)

    # -- integrity ------------------------------------------------------
    def problem(self, level: str = "complete", arrays: tuple[str, ...] = ROW_ARRAYS, what: str = "") -> str | None:
        """Why the cache is below ``level`` (tcskd.store.integrity), None when it is not."""
        return first_problem(self.store, level, arrays, what)

    def require(self, level: str = "complete", arrays: tuple[str, ...] = ROW_ARRAYS, what: str = "") -> None:
        """StoreError unless the cache reaches ``level`` (tcskd.store.integrity)."""
        require(self.store, level, arrays, what)

    # -- rows -----------------------------------------------------------
    def chunks(self, **kw: Any) -> Iterator[FeatureChunk]:
        """The rows chunk by chunk (tcskd.store.chunks.iter_feature_chunks; default: ``features``)."""
        return iter_feature_chunks(self.store, **kw)

    def features(self, view: int | None = 0, dtype: Any = None) -> np.ndarray:
        """Every row's features as stored (``float16`` by default), read chunk by chunk: N x D of ``view``, or
        N x V x D with ``view=None`` (a dense cache: N x T x D, N x V x T x D). Rows whose :meth:`row_ok` is False hold zeros (or whatever a damaged
        source gave): select ``features()[cache.row_ok()]`` for the good ones. ``dtype`` converts per chunk."""
        return self._rows("features", view, dtype, "features")

    def row_ok(self) -> np.ndarray:
        """N booleans: False for rows the cache marked bad (an unreadable image with ``--skip-bad``)."""
        return row_mask(self.store)

    def labels(self) -> np.ndarray:
        """N class labels (int64; below 0: unlabelled)."""
        return np.asarray(self.store.read("labels"), np.int64)

    def sample_index(self) -> np.ndarray:
        """N indices of the rows in the dataset's split (int64)."""
        return np.asarray(self.store.read("sample_index"), np.int64)

    def view_params(self) -> np.ndarray:
        """N x V x P parameters of the stored views (float32; tcskd.views)."""
        return np.asarray(self.store.read("view_params"), np.float32)

    # -- bases ----------------------------------------------------------
    def bases(self) -> list[str]:
        """Names of the complete bases."""
        return self.store.bases()

    def basis(self, name: str) -> Basis:
        """The complete basis ``name``: ``mean`` [D], ``components`` [K, D], ``eigenvalues`` [K],
        ``explained_ratio`` [K] (float64 arrays), ``attrs``; ``project(x)`` maps features to coordinates."""
        return load_basis(self.store, name)

    def coords(self, name: str, view: int | None = 0, dtype: Any = None) -> np.ndarray:
        """The coordinates stored with basis ``name`` (fitted with ``coords=True`` / ``--coords``), float16 as
        stored: N x K of ``view``, or N x V x K with ``view=None``. StoreError when the basis has none
        (``basis(name).project(features())`` computes them)."""
        array = f"bases/{name}/coords"
        self.basis(name)  # a StoreError naming the bases there are when it is not one
        if array not in self.store:
            raise StoreError(f"cache {self.path}: basis '{name}' has no stored coords (fit it with --coords)")
        return self._rows(array, view, dtype, f"coords {name}")

    def _rows(self, array: str, view: int | None, dtype: Any, desc: str) -> np.ndarray:
        """``array`` (rows first, N x V x ...) whole or of one view, filled chunk by chunk."""
        arr = self.store[array]
        shape = tuple(int(s) for s in arr.shape)
        if view is not None and not 0 <= view < shape[1]:
            raise StoreError(f"cache {self.path} has {shape[1]} view(s): no view {view}")
        out = np.empty(shape if view is None else shape[:1] + shape[2:], dtype=dtype or arr.dtype)
        for chunk in self.chunks(array=array, view=view, desc=desc):
            out[chunk.start:chunk.stop] = chunk.x
        return out

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_cache(key_or_path: "str | Path | RemotePath", cache_root: "str | Path | RemotePath | None" = None,
               require: str = "complete", mode: str = "r", arrays: tuple[str, ...] = ROW_ARRAYS,
               what: str = "") -> Cache:
    """The cache ``key_or_path`` (a path, URL, key or unique key prefix under ``cache_root``), opened in
    ``mode`` and refused (StoreError) below the integrity level ``require`` (tcskd.store.integrity)."""
    store = open_store(resolve_cache(key_or_path, cache_root), mode)
    try:
        cache = Cache(store)
        cache.require(require, arrays, what)
    except BaseException:
        store.close()
        raise
    return cache
