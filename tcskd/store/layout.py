"""The cache layout: which arrays a cache holds, their shapes, chunking and fill values.

One function, :func:`create_layout`, creates them all (and writes the
manifest); the cache stage, the benchmarks and the test fixtures use it, so a
cache made anywhere has the same schema (DESIGN.md "The store"). N rows, V
views, D feature dims, C = ceil(N / chunk_rows) chunks:

- ``features``     N x V x D  float16|float32  chunked (chunk_rows, V, D), fill 0; a ``patch`` cache
                   (Manifest.tokens) holds N x V x T x D, T tokens per view, chunked (chunk_rows, V, T, D)
- ``labels``       N          int64            -1 where unlabelled (fill -1)
- ``sample_index`` N          int64            the sample's index in its source (fill -1)
- ``view_params``  N x V x 5  float32          (y0, x0, h, w, hflip), box normalised
- ``row_ok``       N          bool             False for rows skipped as unreadable (--skip-bad)
- ``chunk_done``   C          bool             one storage chunk per data chunk, uncompressed
- ``bases/``       the coordinate systems (tcskd.store.bases)
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from tcskd.store.backends import Store, open_store
from tcskd.store.manifest import Manifest
from tcskd.store.paths import RemotePath, is_remote

log = logging.getLogger(__name__)

#: Every array of a cache.
REQUIRED = ("features", "labels", "sample_index", "view_params", "row_ok", "chunk_done")
#: The arrays holding a chunk's rows (written before its ``chunk_done`` flag).
ROW_ARRAYS = ("features", "labels", "sample_index", "view_params", "row_ok")


def array_specs(m: Manifest) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...], Any]]:
    """name -> (shape, dtype, chunks, fill value) of every array of a cache with manifest ``m``."""
    n, v, d, ch = int(m.n_rows), int(m.views), int(m.dim), int(m.chunk_rows)
    row = (v, m.n_tokens, d) if m.dense else (v, d)
    return {"features": ((n, *row), str(m.dtype), (ch, *row), 0),
            "labels": ((n,), "int64", (ch,), -1),
            "sample_index": ((n,), "int64", (ch,), -1),
            "view_params": ((n, v, 5), "float32", (ch, v, 5), 0),
            "row_ok": ((n,), "bool", (ch,), False),
            "chunk_done": ((m.n_chunks,), "bool", (1,), False)}


def bytes_per_image(dim: int, n_tokens: int = 1, dtype: str = "float16", views: int = 1) -> int:
    """Bytes of ``features`` per image, uncompressed: ``views x n_tokens x dim`` values of ``dtype`` (a global
    cache: ``n_tokens`` 1; a patch cache: Gh * Gw tokens of width D, or K with ``--dim K``). The per-row
    bookkeeping (labels, sample_index, row_ok, view_params) adds 17 + 20 * views bytes."""
    return int(views) * int(n_tokens) * int(dim) * np.dtype(dtype).itemsize


def expected_shapes(m: Manifest) -> dict[str, tuple[int, ...]]:
    """name -> shape of every array the manifest ``m`` implies."""
    return {name: spec[0] for name, spec in array_specs(m).items()}


def create_layout(store: Store, manifest: Manifest) -> None:
    """Create every array of the cache (zstd with checksums; ``chunk_done`` uncompressed), the ``bases``
    group and the manifest, in that order, and flush."""
    for name, (shape, dtype, chunks, fill) in array_specs(manifest).items():
        store.create(name, shape, dtype, chunks, fill_value=fill, compress=name != "chunk_done")
    store.require_group("bases")
    manifest.write(store)
    store.flush()


def create_store(path: "Path | RemotePath", manifest: Manifest, fmt: str) -> Store:
    """A new store of format ``fmt`` at ``path`` with the whole layout of ``manifest``, open for writing.

    An HDF5 store allocates its data now: the room for it is checked first (:func:`check_room`).
    """
    if fmt == "hdf5" and not is_remote(path):
        n, v, d = int(manifest.n_rows), int(manifest.views), int(manifest.dim) * manifest.n_tokens
        raw = n * v * d * np.dtype(manifest.dtype).itemsize + n * (8 + 8 + 1 + v * 5 * 4) + manifest.n_chunks
        check_room(Path(path).parent, raw + raw // 100 + (64 << 10))
    store = open_store(path, "a", fmt)
    try:
        create_layout(store, manifest)
    except BaseException:
        store.close()
        raise
    return store


def check_room(folder: Path, nbytes: int) -> None:
    """OSError (ENOSPC or EFBIG) unless a file of ``nbytes`` fits in ``folder``.

    An HDF5 store allocates all its data when it is created, and HDF5 handles a
    write failure at that point badly (it can even crash the process), so the
    free space and the file size limit are checked first.
    """
    import resource

    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    if free < nbytes:
        raise OSError(errno.ENOSPC, f"an HDF5 store of {nbytes / 2**20:.1f} MiB does not fit in {folder} "
                                    f"({free / 2**20:.1f} MiB free): {os.strerror(errno.ENOSPC)}")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < nbytes:
        raise OSError(errno.EFBIG, f"an HDF5 store of {nbytes / 2**20:.1f} MiB exceeds this process's file size "
                                   f"limit ({limit} bytes): {os.strerror(errno.EFBIG)}")
