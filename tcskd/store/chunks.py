"""Reading a cache's rows chunk by chunk: the one chunk iterator every reader uses.

Rows are read in spans of the store's own chunk rows (the manifest's
``chunk_rows``) unless a reader asks for another span; a span that cannot be
read (a damaged chunk fails its checksum) becomes a StoreError naming the
array and the rows (Store.damaged).
"""

from __future__ import annotations

import logging
import os
import sys
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from tcskd.errors import StoreError
from tcskd.store.backends import Store, iter_chunks
from tcskd.store.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class FeatureChunk:
    """One chunk of rows: the rows of an array (every view, or one) plus the row mask."""

    index: int
    start: int
    stop: int
    x: np.ndarray      # [rows, V, D] as stored ([rows, D] for one view)
    ok: np.ndarray     # [rows] bool


def read_chunk_rows(store: Store, chunk_rows: int | None = None) -> int:
    """Rows per read: ``chunk_rows`` when given, else the store's own (the manifest's, else the
    chunking of ``features``)."""
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise StoreError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return int(chunk_rows)
    ch = Manifest.read(store).chunk_rows
    if ch is None:
        ch = store["features"].chunks[0] or 1024
    return int(ch)


def row_mask(store: Store) -> np.ndarray:
    """``row_ok`` as a bool array (all True when the store has none)."""
    n = int(store["features"].shape[0])
    if "row_ok" not in store:
        return np.ones(n, bool)
    ok = np.asarray(store.read("row_ok"), dtype=bool)
    if ok.shape != (n,):
        raise StoreError(f"{store.path}: row_ok has shape {ok.shape}, features have {n} rows")
    return ok


def iter_feature_chunks(store: Store, chunk_rows: int | None = None, desc: str = "read",
                        chunk_ids: Iterable[int] | None = None, prefetch: int = 2,
                        ok: np.ndarray | None = None, readers: int = 1, array: str = "features",
                        view: int | None = None, progress: bool | None = None) -> Iterator[FeatureChunk]:
    """Chunks of ``array`` (default ``features``) in order, read ``prefetch`` ahead on ``readers`` threads,
    with a progress bar (``progress`` None: on a terminal only; False: never).

    ``chunk_ids`` keeps only those chunks; ``view`` reads that view only; ``ok`` is the store's
    :func:`row_mask` when the caller has it already (read here otherwise).
    """
    from tqdm import tqdm

    arr = store[array]
    n = int(arr.shape[0])
    ch = read_chunk_rows(store, chunk_rows)
    ok_all = row_mask(store) if ok is None else ok
    spans = list(iter_chunks(n, ch))
    if chunk_ids is not None:
        wanted = set(int(c) for c in chunk_ids)
        spans = [s for s in spans if s[0] in wanted]

    def read(span: tuple[int, int, int]) -> FeatureChunk:
        c, start, stop = span
        try:
            x = np.asarray(arr[start:stop] if view is None else arr[start:stop, view])
        except Exception as e:  # a damaged chunk fails its checksum: name it
            raise store.damaged(array, start, stop, e) from e
        return FeatureChunk(c, start, stop, x, ok_all[start:stop])

    bar = tqdm(total=len(spans), desc=desc, unit="chunk", file=sys.stderr, dynamic_ncols=True,
               disable=None if progress is None else not progress, mininterval=1.0)
    ahead = max(prefetch, readers)
    try:
        with ThreadPoolExecutor(max_workers=max(1, readers)) as pool:
            pending: list[Future[FeatureChunk]] = []
            it = iter(spans)
            for span in it:
                pending.append(pool.submit(read, span))
                if len(pending) > ahead:
                    break
            while pending:
                chunk = pending.pop(0).result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(read, nxt))
                yield chunk
                bar.update(1)
    finally:
        bar.close()


class ChunkLRU:
    """Chunks of one array of a store, each turned by ``process(chunk_index, rows)`` into what a reader needs
    (e.g. targets), kept in a least-recently-used cache of at most ``budget_bytes`` (the processed arrays'
    bytes; at least one chunk is always kept).

    Made for DataLoader workers: the store is opened on first use in each process (a forked worker opens its
    own handle) and every process keeps its own cache, so the bound holds per process. ``held_bytes`` and
    ``reads`` say what it holds and how many chunks it has read.
    """

    def __init__(self, path: Any, array: str, chunk_rows: int, n_rows: int,
                 process: Callable[[int, np.ndarray], np.ndarray], budget_bytes: int) -> None:
        self.path, self.array, self.chunk_rows, self.n_rows = path, array, int(chunk_rows), int(n_rows)
        self.process, self.budget_bytes = process, int(budget_bytes)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._store: Store | None = None
        self._pid = -1
        self.held_bytes = 0
        self.reads = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_store=None, _pid=-1, _cache=OrderedDict(), held_bytes=0)
        return state

    def _open(self) -> Store:
        from tcskd.store.backends import open_store

        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = open_store(self.path), os.getpid()
            self._cache.clear()
            self.held_bytes = 0
        return self._store

    def get(self, c: int) -> np.ndarray:
        """The processed chunk ``c`` (read, and older chunks dropped past the budget, when not held)."""
        store = self._open()
        hit = self._cache.get(c)
        if hit is not None:
            self._cache.move_to_end(c)
            return hit
        start, stop = c * self.chunk_rows, min(self.n_rows, (c + 1) * self.chunk_rows)
        out = self.process(c, store.read_rows(self.array, start, stop))
        self.reads += 1
        while self._cache and self.held_bytes + out.nbytes > self.budget_bytes:
            _, old = self._cache.popitem(last=False)
            self.held_bytes -= old.nbytes
        self._cache[c] = out
        self.held_bytes += out.nbytes
        return out

    def close(self) -> None:
        """Drop the cache and close this process's store handle."""
        self._cache.clear()
        self.held_bytes = 0
        if self._store is not None and self._pid == os.getpid():
            self._store.close()
        self._store = None
