"""``open_cache``: a cache by key or path, checked to a level of integrity, as a typed handle.

The stages open caches through it (the basis fit, training, ``tcskd eval``,
the cache stage's hit test), so every reader makes the same checks
(:mod:`tcskd.store.integrity`) and reads rows the same way
(:mod:`tcskd.store.chunks`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tcskd.store.backends import Store, open_store
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
        """Feature dimension D."""
        return int(self.store["features"].shape[2])

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

    def row_ok(self) -> np.ndarray:
        return row_mask(self.store)

    def labels(self) -> np.ndarray:
        return np.asarray(self.store.read("labels"), np.int64)

    def sample_index(self) -> np.ndarray:
        return np.asarray(self.store.read("sample_index"), np.int64)

    def view_params(self) -> np.ndarray:
        return np.asarray(self.store.read("view_params"), np.float32)

    # -- bases ----------------------------------------------------------
    def bases(self) -> list[str]:
        """Names of the complete bases."""
        return self.store.bases()

    def basis(self, name: str) -> Basis:
        return load_basis(self.store, name)

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
