"""Streaming first and second moments of features, in float64, and the PCA of them.

Below both stages that fit a basis: stage 2 (``tcskd basis``, tcskd.subspace.fit) streams a cache's
``features`` through :func:`stream_moments`; stage 1 (``tcskd cache --tokens patch --dim K``,
tcskd.cache.dense) sums the teacher's tokens of a sample of images into a :class:`Moments` before any
chunk is written. Both turn the sums into a basis with :func:`pca_of_moments` (a :class:`Fitted`, which
tcskd.store.bases writes).

One pass over ``features`` chunk by chunk, holding O(D^2 + chunk) memory (a patch cache's every token is
a sample):
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
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from tcskd.errors import StoreError
from tcskd.store.backends import Store
from tcskd.store.chunks import FeatureChunk, iter_feature_chunks, read_chunk_rows, row_mask

log = logging.getLogger(__name__)

VIEWS = ("0", "all")
STATE_KEYS = ("count", "total", "outer")


class Moments:
    """Mergeable float64 sums of ``x - shift`` and ``(x - shift)(x - shift)^T``.

    The three sums live in one (D+1) x (D+1) matrix, the second moment of the
    samples with a 1 appended: ``outer`` is its D x D block, ``total`` its last
    column and ``count`` its corner. One matrix product per chunk then yields all
    three, and the sums can be summed across processes as one tensor.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu",
                 shift: np.ndarray | torch.Tensor | str | None = None) -> None:
        """``shift``: a [D] vector, None (zeros) or ``"first"`` (the first sample :meth:`update` sees;
        only for one process: every part that is merged must use the same shift)."""
        self.dim = int(dim)
        self.device = torch.device(device)
        f64 = dict(dtype=torch.float64, device=self.device)
        self._shift_pending = isinstance(shift, str)
        if isinstance(shift, str) and shift != "first":
            raise ValueError(f"unknown shift '{shift}' (a vector, None or 'first')")
        if shift is None or isinstance(shift, str):
            self.shift = torch.zeros(self.dim, **f64)
        else:
            self.shift = torch.as_tensor(np.asarray(shift, np.float64) if not isinstance(shift, torch.Tensor)
                                         else shift).to(**f64).reshape(self.dim).clone()
        self.aug = torch.zeros(self.dim + 1, self.dim + 1, **f64)

    @property
    def count(self) -> torch.Tensor:
        return self.aug[self.dim, self.dim]

    @property
    def total(self) -> torch.Tensor:
        return self.aug[: self.dim, self.dim]

    @property
    def outer(self) -> torch.Tensor:
        return self.aug[: self.dim, : self.dim]

    # -- accumulation ---------------------------------------------------
    def update(self, x: torch.Tensor | np.ndarray) -> None:
        """Add the samples ``x`` [n, D] (any float dtype, any device; promoted to float64 here)."""
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        if t.ndim != 2 or t.shape[1] != self.dim:
            raise ValueError(f"expected samples of shape [n, {self.dim}], got {tuple(t.shape)}")
        if t.shape[0] == 0:
            return
        if self._shift_pending:
            self.shift = t[0].to(self.device, torch.float64).clone()
            self._shift_pending = False
        y = torch.empty(t.shape[0], self.dim + 1, dtype=torch.float64, device=self.device)
        body = y[:, : self.dim]
        body.copy_(t, non_blocking=True)
        body.sub_(self.shift)
        y[:, self.dim] = 1.0
        self.aug.addmm_(y.T, y)

    def finite(self) -> bool:
        """Whether every sum is finite: false exactly when some sample held NaN/Inf."""
        return bool(torch.isfinite(self.aug).all())

    def state(self) -> dict[str, torch.Tensor]:
        """The summable tensors (count, total, outer): views of one matrix, see :meth:`all_reduce`."""
        return {"count": self.count, "total": self.total, "outer": self.outer}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for k in STATE_KEYS:
            getattr(self, k).copy_(torch.as_tensor(state[k]).to(self.device, torch.float64))
        self.aug[self.dim, : self.dim] = self.total
        self._shift_pending = False

    def merge(self, other: "Moments") -> "Moments":
        """Add another accumulator's sums into this one (same dim and shift)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dimension {other.dim} into {self.dim}")
        if not torch.equal(other.shift.to(self.device), self.shift):
            raise ValueError("cannot merge moments accumulated with different shifts")
        self.aug.add_(other.aug.to(self.device))
        return self

    def all_reduce(self, group: object | None = None) -> None:
        """Sum the state over the ranks of a torch.distributed process group, in place."""
        import torch.distributed as dist

        dist.all_reduce(self.aug, op=dist.ReduceOp.SUM, group=group)

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


# -- checking the features read -------------------------------------------------

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
    """Usable rows [m, V, D] -> samples [m, D] (view 0) or [m*V, D] (every view); rows of a patch cache
    [m, V, T, D] -> every token a sample: [m*T, D] (view 0) or [m*V*T, D]."""
    if view == "0":
        return x[:, 0].reshape(-1, x.shape[-1])
    if view == "all":
        return x.reshape(-1, x.shape[-1])
    raise StoreError(f"unknown view '{view}' (choose 0 or all)")


def first_sample(store: Store, ok: np.ndarray) -> np.ndarray:
    """View 0 of the first usable row (``ok``, the row mask, has one; a patch cache: its first token): the shift
    that keeps the sums well conditioned."""
    r = int(np.argmax(ok))
    row = store.read_rows("features", r, r + 1)
    x = np.asarray(row[0, 0], dtype=np.float64).reshape(-1, row.shape[-1])[0]
    if not np.isfinite(x).all():
        ch = read_chunk_rows(store)
        raise StoreError(f"cache {store.path}: features chunk {r // ch} (row {r}, view 0) holds NaN/Inf "
                         f"values; the cache is damaged: rebuild it")
    return x


def stream_moments(store: Store, view: str = "0", device: torch.device | str = "cpu",
                   chunk_rows: int | None = None, chunk_ids: Iterable[int] | None = None,
                   on_samples: Callable[[torch.Tensor], None] | None = None,
                   desc: str = "moments", ok: np.ndarray | None = None, check: bool = True) -> Moments:
    """One pass over ``features``: float64 moments of the usable samples on ``device``.

    Every sample summed is checked for NaN/Inf: the sums are finite exactly when
    the samples are, so they are checked once at the end and only then are the
    chunks searched for the first bad row (a StoreError names it). ``check=False``
    leaves that to the caller (:func:`raise_if_not_finite`, after summing the
    parts of several processes, so that every process fails alike). ``on_samples``
    gets each chunk's samples [m, D] (on ``device``, stored dtype, checked)
    before they are added, e.g. to keep them for an exact SVD. With
    ``chunk_ids`` (one share of the chunks, under torchrun) the shift is the
    store's first usable sample, so that every share's sums can be added.

    On CUDA each chunk goes through pinned memory and is copied asynchronously
    in its stored dtype; reading runs on threads ahead of the device.
    """
    if view not in VIEWS:
        raise StoreError(f"unknown view '{view}' (choose 0 or all)")
    device = torch.device(device)
    dim = int(store["features"].shape[-1])
    ok = row_mask(store) if ok is None else ok
    if not ok.any():
        raise StoreError(f"cache {store.path} has no usable rows (row_ok is False everywhere)")
    cuda = device.type == "cuda"
    mom = Moments(dim, device, shift=first_sample(store, ok) if chunk_ids is not None else "first")
    for chunk in iter_feature_chunks(store, chunk_rows, desc=desc, chunk_ids=chunk_ids, ok=ok,
                                     readers=4 if cuda else 1):
        if not chunk.ok.any():
            continue
        rows = chunk.x if chunk.ok.all() else chunk.x[chunk.ok]
        x = torch.from_numpy(np.ascontiguousarray(rows))
        if cuda:
            x = x.pin_memory()
        x = x.to(device, non_blocking=True)
        s = samples_of(x, view)
        if on_samples is not None:
            check_finite(store, chunk, x)
            on_samples(s)
        mom.update(s)
    if check:
        raise_if_not_finite(mom, store, chunk_rows, chunk_ids, ok)
    return mom


def raise_if_not_finite(mom: Moments, store: Store, chunk_rows: int | None = None,
                        chunk_ids: Iterable[int] | None = None, ok: np.ndarray | None = None) -> None:
    """When the sums are not finite: search the chunks (``chunk_ids``, else all) for the first usable row
    with NaN/Inf and raise the StoreError naming it (a generic one when the bad row is in another
    process's share)."""
    if mom.finite():
        return
    ok = row_mask(store) if ok is None else ok
    for chunk in iter_feature_chunks(store, chunk_rows, desc="locating NaN/Inf", chunk_ids=chunk_ids, ok=ok):
        if chunk.ok.any():
            check_finite(store, chunk, torch.from_numpy(np.ascontiguousarray(chunk.x[chunk.ok])))
    raise StoreError(f"cache {store.path}: the feature moments are not finite (NaN/Inf in the features); "
                     f"the cache is damaged: run `tcskd cache verify`")


# -- the PCA of moments (a basis before it is written) ------------------------------

@dataclass
class Fitted:
    """A basis before it is written: K kept coordinates plus all D spectra for the plot."""

    kind: str
    mean: np.ndarray            # [D]
    components: np.ndarray      # [K, D]
    eigenvalues: np.ndarray     # [K]
    explained_ratio: np.ndarray  # [K] cumulative
    spectrum: np.ndarray        # all available eigenvalues (the scree)
    total_variance: float
    samples: int

    @property
    def k(self) -> int:
        return int(self.components.shape[0])


def pca_of_moments(mom: Moments, k: "int | Callable[[np.ndarray, float], int]") -> Fitted:
    """The PCA basis (eigh of the covariance, decreasing eigenvalues, sign convention) of ``mom``, keeping ``k``
    components (or ``k(spectrum, total_variance)`` of them)."""
    cov = mom.covariance()
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    comps = sign_convention(evecs.T)
    spectrum = evals.clamp_min(0).cpu().numpy()
    total = float(torch.diagonal(cov).sum().item())
    k = int(k(spectrum, total)) if callable(k) else int(k)
    note_rank(k, mom.n)
    return fitted_basis("pca", mom.mean(), comps[:k], spectrum, total, k, mom.n)


def fitted_basis(kind: str, mean: torch.Tensor, comps: torch.Tensor, spectrum: np.ndarray, total: float,
                 k: int, samples: int) -> Fitted:
    """A :class:`Fitted` of K = ``k`` rows of ``comps`` (StoreError when the data have no variance)."""
    if not total > 0:
        raise StoreError("the features have zero variance: no coordinate system can be fitted")
    ratio = np.cumsum(spectrum) / total
    return Fitted(kind=kind, mean=mean.detach().cpu().numpy().astype(np.float64),
                  components=comps.detach().cpu().numpy().astype(np.float64),
                  eigenvalues=spectrum[:k].astype(np.float64).copy(),
                  explained_ratio=np.minimum(ratio[:k], 1.0), spectrum=spectrum, total_variance=total,
                  samples=int(samples))


def sign_convention(comps: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-magnitude entry is positive (deterministic signs)."""
    idx = comps.abs().argmax(dim=1, keepdim=True)
    signs = torch.where(torch.gather(comps, 1, idx) < 0, -1.0, 1.0).to(comps.dtype)
    return comps * signs


def note_rank(k: int, samples: int) -> None:
    """Warn when K exceeds the rank of ``samples`` centred samples."""
    if k > samples - 1:
        log.warning("K=%d exceeds the rank of the centred data (at most %d for %d samples): the last %d "
                    "component(s) have eigenvalue ~0 and arbitrary directions", k, samples - 1, samples,
                    k - (samples - 1))
