"""Streaming first and second moments of cached features, in float64.

One pass over ``features`` chunk by chunk, holding O(D^2 + chunk) memory:
``count``, ``total`` (sum of x) and ``outer`` (sum of x x^T), all float64 on
the chosen device. Rows whose ``row_ok`` is False are skipped; ``view`` '0'
takes view 0 of every row, 'all' takes every view as a separate sample.

Sums are taken of ``x - shift`` where ``shift`` is one fixed sample (the first
usable row's view 0), so the covariance ``(outer - total total^T / n)`` does
not lose precision to a large mean. The sums are plain tensors: ``state()``
can be summed across processes (``all_reduce``) or merged pairwise
(``merge``), provided every part used the same shift.
"""

from __future__ import annotations

import logging
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from tcskd.cache.store import Store, iter_chunks
from tcskd.errors import StoreError

log = logging.getLogger(__name__)

VIEWS = ("0", "all")
STATE_KEYS = ("count", "total", "outer")


class Moments:
    """Mergeable float64 sums of ``x - shift`` and ``(x - shift)(x - shift)^T``."""

    def __init__(self, dim: int, device: torch.device | str = "cpu",
                 shift: np.ndarray | torch.Tensor | None = None) -> None:
        self.dim = int(dim)
        self.device = torch.device(device)
        f64 = dict(dtype=torch.float64, device=self.device)
        if shift is None:
            self.shift = torch.zeros(self.dim, **f64)
        else:
            self.shift = torch.as_tensor(np.asarray(shift, np.float64) if not isinstance(shift, torch.Tensor)
                                         else shift).to(**f64).reshape(self.dim).clone()
        self.count = torch.zeros((), **f64)
        self.total = torch.zeros(self.dim, **f64)
        self.outer = torch.zeros(self.dim, self.dim, **f64)

    # -- accumulation ---------------------------------------------------
    def update(self, x: torch.Tensor | np.ndarray) -> None:
        """Add the samples ``x`` [n, D] (any float dtype; promoted to float64)."""
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        if t.ndim != 2 or t.shape[1] != self.dim:
            raise ValueError(f"expected samples of shape [n, {self.dim}], got {tuple(t.shape)}")
        if t.shape[0] == 0:
            return
        y = t.to(self.device, non_blocking=True).to(torch.float64) - self.shift
        self.count += y.shape[0]
        self.total += y.sum(0)
        self.outer.addmm_(y.T, y)

    def state(self) -> dict[str, torch.Tensor]:
        """The summable tensors (count, total, outer): all-reduce these with SUM."""
        return {"count": self.count, "total": self.total, "outer": self.outer}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for k in STATE_KEYS:
            getattr(self, k).copy_(torch.as_tensor(state[k]).to(self.device, torch.float64))

    def merge(self, other: "Moments") -> "Moments":
        """Add another accumulator's sums into this one (same dim and shift)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dimension {other.dim} into {self.dim}")
        if not torch.equal(other.shift.to(self.device), self.shift):
            raise ValueError("cannot merge moments accumulated with different shifts")
        for k in STATE_KEYS:
            getattr(self, k).add_(getattr(other, k).to(self.device))
        return self

    def all_reduce(self, group: object | None = None) -> None:
        """Sum the state over the ranks of a torch.distributed process group, in place."""
        import torch.distributed as dist

        for t in self.state().values():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)

    # -- results --------------------------------------------------------
    @property
    def n(self) -> int:
        return int(round(float(self.count.item())))

    def mean(self) -> torch.Tensor:
        """Sample mean [D]."""
        self._need(1)
        return self.shift + self.total / self.count

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        """Covariance [D, D], divided by ``n - ddof`` (1: the unbiased estimate)."""
        self._need(ddof + 1)
        c = (self.outer - torch.outer(self.total, self.total) / self.count) / (self.count - ddof)
        return (c + c.T) / 2

    def second_moment(self) -> torch.Tensor:
        """Raw per-dimension second moment E[x_d^2] [D] (not centred)."""
        self._need(1)
        n = self.count
        return (torch.diagonal(self.outer) + 2 * self.shift * self.total) / n + self.shift ** 2

    def _need(self, n: int) -> None:
        if self.n < n:
            raise StoreError(f"need at least {n} usable sample(s) for these statistics, have {self.n}")


# -- reading the store --------------------------------------------------------

@dataclass
class FeatureChunk:
    """One chunk of rows: raw features of every view plus the row mask."""

    index: int
    start: int
    stop: int
    x: np.ndarray      # [rows, V, D] as stored
    ok: np.ndarray     # [rows] bool


def read_chunk_rows(store: Store, chunk_rows: int | None = None) -> int:
    """Rows per read: ``chunk_rows`` when given, else the manifest's."""
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise StoreError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return int(chunk_rows)
    ch = store.manifest.get("chunk_rows")
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
                        chunk_ids: Iterable[int] | None = None, prefetch: int = 2) -> Iterator[FeatureChunk]:
    """Chunks of ``features`` in order, read ``prefetch`` ahead on a thread, with a progress bar."""
    from tqdm import tqdm

    feats = store["features"]
    n = int(feats.shape[0])
    ch = read_chunk_rows(store, chunk_rows)
    ok_all = row_mask(store)
    spans = list(iter_chunks(n, ch))
    if chunk_ids is not None:
        wanted = set(int(c) for c in chunk_ids)
        spans = [s for s in spans if s[0] in wanted]

    def read(span: tuple[int, int, int]) -> FeatureChunk:
        c, start, stop = span
        try:
            x = np.asarray(feats[start:stop])
        except Exception as e:  # a damaged chunk fails its checksum: name it
            raise store.damaged("features", start, stop, e) from e
        return FeatureChunk(c, start, stop, x, ok_all[start:stop])

    bar = tqdm(total=len(spans), desc=desc, unit="chunk", file=sys.stderr, dynamic_ncols=True,
               disable=None, mininterval=1.0)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: list[Future[FeatureChunk]] = []
            it = iter(spans)
            for span in it:
                pending.append(pool.submit(read, span))
                if len(pending) > prefetch:
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


def check_finite(store: Store, chunk: FeatureChunk, x: torch.Tensor) -> None:
    """StoreError naming the chunk when ``x`` (the usable rows, [m, V, D]) holds NaN/Inf."""
    finite = torch.isfinite(x).flatten(1).all(1)
    if bool(finite.all()):
        return
    local_rows = np.flatnonzero(chunk.ok)
    bad = int(torch.nonzero(~finite)[0].item())
    row = chunk.start + int(local_rows[bad])
    views = torch.nonzero(~torch.isfinite(x[bad]).all(-1)).flatten().tolist()
    raise StoreError(
        f"cache {store.path}: features chunk {chunk.index} (rows {chunk.start}-{chunk.stop - 1}) holds "
        f"NaN/Inf values (first at row {row}, view {views[0]}); the cache is damaged: rebuild it")


def samples_of(x: torch.Tensor, view: str) -> torch.Tensor:
    """Usable rows [m, V, D] -> samples [m, D] (view 0) or [m*V, D] (every view)."""
    if view == "0":
        return x[:, 0, :]
    if view == "all":
        return x.reshape(-1, x.shape[-1])
    raise StoreError(f"unknown view '{view}' (choose 0 or all)")


def first_sample(store: Store) -> np.ndarray:
    """View 0 of the first usable row: the shift that keeps the sums well conditioned."""
    ok = row_mask(store)
    if not ok.any():
        raise StoreError(f"cache {store.path} has no usable rows (row_ok is False everywhere)")
    r = int(np.argmax(ok))
    x = np.asarray(store.read_rows("features", r, r + 1)[0, 0], dtype=np.float64)
    if not np.isfinite(x).all():
        ch = read_chunk_rows(store)
        raise StoreError(f"cache {store.path}: features chunk {r // ch} (row {r}, view 0) holds NaN/Inf "
                         f"values; the cache is damaged: rebuild it")
    return x


def stream_moments(store: Store, view: str = "0", device: torch.device | str = "cpu",
                   chunk_rows: int | None = None, chunk_ids: Iterable[int] | None = None,
                   on_samples: Callable[[torch.Tensor], None] | None = None,
                   desc: str = "moments") -> Moments:
    """One pass over ``features``: float64 moments of the usable samples on ``device``.

    Every usable row is checked for NaN/Inf (a StoreError names the chunk).
    ``on_samples`` gets each chunk's samples [m, D] (on ``device``, stored dtype)
    before they are added, e.g. to keep them for an exact SVD.
    """
    if view not in VIEWS:
        raise StoreError(f"unknown view '{view}' (choose 0 or all)")
    device = torch.device(device)
    dim = int(store["features"].shape[2])
    mom = Moments(dim, device, shift=first_sample(store))
    for chunk in iter_feature_chunks(store, chunk_rows, desc=desc, chunk_ids=chunk_ids):
        if not chunk.ok.any():
            continue
        x = torch.from_numpy(np.ascontiguousarray(chunk.x[chunk.ok])).to(device, non_blocking=True)
        check_finite(store, chunk, x)
        s = samples_of(x, view)
        if on_samples is not None:
            on_samples(s)
        mom.update(s)
    return mom
