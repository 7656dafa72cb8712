"""Training rows and targets: which rows of the dataset the cache holds, and their targets.

Rows. The cache's ``sample_index`` maps each training image (a row of the
dataset's ``train`` split; of the cache's own split when that is ``test``) to
its store row. Training refuses (StoreError) a cache that is incomplete, has
unwritten or duplicate rows, holds samples the dataset does not have, has
labels that disagree with the dataset's, or lacks samples of the split (unless
the cache was built with ``--limit``: then the student trains on the samples it
holds). Rows with ``row_ok`` False (unreadable images) are left out.

Targets (N x V x K float32, loaded once into memory, chunk by chunk):
- ``tcs``: ``bases/<name>/coords`` when stored (its first K columns), else
  ``features`` projected with the basis;
- ``fitnet``: the basis named by ``--basis`` if its kind is ``identity``, else
  the first stored basis of kind ``identity``, else the raw features: mean 0,
  identity components, no whitening (targets = the raw features). K is always
  D: ``--dim`` does not apply (like ``tcskd basis --kind identity``);
- ``ce``: none (no feature is read);
- ``online``: computed live by the teacher in the loop (tcskd.train.loop).

Dense targets (a ``patch`` cache, Manifest.tokens; :func:`load_dense_targets`): N x V x T x K float16 in
memory, T = Gh * Gw tokens in row-major (y, x) order, read chunk by chunk: a raw token cache is projected
token by token with the basis (PCA or random: ``B (x - mean)`` / whitening; fitnet's identity: the raw tokens);
a coordinate cache (``Manifest.coords_of``: ``features`` already holds the first K coordinates in
``bases/<coords_of>``) is read as it is, its first ``--dim`` columns (whitened when that basis is). The global
targets of a patch cache (``--mimic-on global|both``) are the mean over the view's tokens of their coordinates:
the projection is linear, so that is the coordinates of the mean-pooled token (the teacher's mean-pooled
embedding); they get their own scale (the root mean square of the pooled coordinates).

With ``--target-norm global`` (the default) all targets are divided by one
number, sqrt of the mean variance of the K coordinates (:func:`target_scale`),
so that lambda means the same for any teacher; ``none`` keeps them as stored.

Where they live (``--targets``): ``ram`` loads them all at the start, as above; ``store`` keeps none of them:
:class:`StoreTargets` reads the chunk of the requested rows through the store layer
(tcskd.store.chunks.ChunkLRU) and turns its training rows into targets with the very functions of the ram path
(:func:`chunk_targets`, :func:`chunk_dense_coords`, then the same division by the scale), so a row's targets
are the same bits either way; each process (each DataLoader worker) keeps the last chunks it made in an LRU of
``--target-cache-mb``. The scales that come from the data (fitnet's raw features, pooled tokens) are summed in
one pass over the chunks (equal to the ram path's to float64 rounding; the float32 divisor the same). ``auto``
(:func:`choose_target_mode`) takes ram when the targets take < 4 GB and < 25 % of the available memory.

The datasets, sampler and augmentation that feed the images and these targets to
the loop are in tcskd.train.data (:class:`~tcskd.train.data.BlockSampler` for targets read from the store).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from tcskd.data import Source
from tcskd.errors import StoreError, TcskdError
from tcskd.store.backends import Store
from tcskd.store.bases import Basis, load_basis
from tcskd.store.chunks import ChunkLRU, iter_feature_chunks, read_chunk_rows
from tcskd.store.integrity import missing_data

log = logging.getLogger(__name__)

RAW = "raw"
#: K of ``--method tcs`` without ``--dim``: the leading coordinates kept (chosen on validation, see README).
DEFAULT_DIM = 64


# -- which basis ------------------------------------------------------------

def raw_basis(dim: int) -> Basis:
    """The identity 'basis' of FitNet on raw features: mean 0, components I, no whitening."""
    return Basis(RAW, "identity", np.zeros(dim), np.eye(dim), np.ones(dim),
                 np.arange(1, dim + 1, dtype=np.float64) / dim, False, {})


def resolve_basis(store: Store, method: str, name: str, dim: int | None,
                  default: int | None = None, coords_of: str | None = None) -> Basis | None:
    """The coordinate system of ``method`` (None for ``ce``), truncated to ``dim`` (not for fitnet). On a
    coordinate cache (``coords_of``) it is that basis: ``name`` must be it (the default name ``pca`` means it)."""
    if method == "ce":
        return None
    if coords_of is not None:
        if method == "fitnet":
            raise StoreError(f"cache {store.path} holds {coords_of} coordinates, not raw tokens: --method fitnet "
                             f"needs a cache built without --dim")
        if name not in (coords_of, "pca"):
            raise StoreError(f"cache {store.path} holds coordinates in basis '{coords_of}': --basis must be "
                             f"{coords_of} (raw tokens, needed for '{name}', are not stored)")
        name = coords_of
    if method == "fitnet":
        names = store.bases()
        if name in names and store.attrs(f"bases/{name}").get("kind") == "identity":
            chosen = name
        else:
            chosen = next((n for n in names if store.attrs(f"bases/{n}").get("kind") == "identity"), None)
        basis = load_basis(store, chosen) if chosen else raw_basis(int(store["features"].shape[-1]))
        if chosen is None:
            log.info("fitnet: no identity basis stored; targets are the raw features")
        if dim is not None and dim != basis.k:
            log.warning("fitnet mimics every feature dimension (K = D = %d); --dim %d is not used", basis.k, dim)
        return basis
    basis = load_basis(store, name)
    if dim is not None and dim > basis.k:
        raise StoreError(f"--dim {dim} exceeds the {basis.k} components of basis '{basis.name}'")
    default = DEFAULT_DIM if default is None else default
    if dim is None and basis.k > default:
        log.info("K = %d, the default (of the %d components of basis '%s')", default, basis.k, basis.name)
    return basis.truncate(dim if dim is not None else min(default, basis.k))


# -- rows -------------------------------------------------------------------

def match_rows(store: Store, split_source: Source, train_source: Source,
               limited: bool) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``train_source``, store rows) of the training samples the cache holds, in source order."""
    si = np.asarray(store.read("sample_index"), np.int64)
    ok = np.asarray(store.read("row_ok"), bool) if "row_ok" in store else np.ones(len(si), bool)
    labels = np.asarray(store.read("labels"), np.int64)
    where = f"cache {store.path}"
    if (si[ok] < 0).any():
        raise StoreError(f"{where} has {int((si[ok] < 0).sum())} unwritten rows (sample_index -1)")
    good = np.flatnonzero(ok)
    if len(np.unique(si[good])) != len(good):
        raise StoreError(f"{where} holds some samples twice (duplicate sample_index values)")
    # Every cached sample must exist in the dataset, with the same label.
    pos = {int(v): i for i, v in enumerate(split_source.indices)}
    unknown = [int(v) for v in si[good] if int(v) not in pos]
    if unknown:
        raise StoreError(f"{where} does not match data {split_source.spec} (split {split_source.split}): "
                         f"{len(unknown)} cached sample(s) are not in it, e.g. sample {unknown[0]}")
    src_lab = split_source.labels[[pos[int(v)] for v in si[good]]]
    bad = np.flatnonzero((labels[good] != src_lab) & (labels[good] >= 0))
    if len(bad):
        raise StoreError(f"{where} does not match data {split_source.spec}: the label of sample "
                         f"{int(si[good][bad[0]])} differs ({int(labels[good][bad[0]])} cached, "
                         f"{int(src_lab[bad[0]])} in the data); {len(bad)} differ in all")
    # Map the training split's rows to store rows.
    store_of = {int(v): i for i, v in enumerate(si) if v >= 0}
    src_rows, store_rows, missing = [], [], 0
    for r, v in enumerate(train_source.indices):
        s = store_of.get(int(v))
        if s is None:
            missing += 1
        elif ok[s]:
            src_rows.append(r)
            store_rows.append(s)
    if missing and not limited:
        raise StoreError(f"{where} lacks {missing} of the {len(train_source)} samples of "
                         f"{train_source.spec} split {train_source.split}: it does not match the data")
    if missing:
        log.info("the cache was built with --limit: training on the %d samples it holds", len(src_rows))
    n_bad = int((~ok).sum())
    if n_bad:
        log.warning("%d cached row(s) are marked unreadable (row_ok False) and are left out", n_bad)
    if not src_rows:
        raise StoreError(f"{where} holds none of the samples of {train_source.spec} split {train_source.split}")
    return np.asarray(src_rows, np.int64), np.asarray(store_rows, np.int64)


# -- targets ----------------------------------------------------------------

def target_source(store: Store, basis: Basis) -> tuple[str, bool]:
    """(the array the global targets are read from, whether it is stored coordinates): ``bases/<name>/coords``
    when stored (checked: enough columns, no chunk missing), else ``features``."""
    coords_name = f"bases/{basis.name}/coords"
    use_coords = basis.name != RAW and coords_name in store
    if use_coords and store[coords_name].shape[2] < basis.k:
        raise StoreError(f"{coords_name} has {store[coords_name].shape[2]} columns; need {basis.k}")
    if use_coords:
        lost = missing_data(store, (coords_name,))
        if lost:
            raise StoreError(f"cache {store.path} is damaged: {lost[0]}; fit the basis again")
    return (coords_name if use_coords else "features"), use_coords


def _float32(block: np.ndarray) -> torch.Tensor:
    """``block`` as a float32 tensor (float16 converted by torch: exact, and several times numpy's speed)."""
    return torch.from_numpy(np.ascontiguousarray(block)).float()


def chunk_targets(block: np.ndarray, basis: Basis, use_coords: bool) -> np.ndarray:
    """Rows x V x K float32 targets (unscaled) of ``block`` (rows of ``features`` or of stored coords); one
    function for the ram and the store paths, so both give the same bits for the same rows of a chunk."""
    if use_coords or basis.name == RAW:
        return np.asarray(block[..., :basis.k], np.float32)
    return basis.project(_float32(block)).numpy()


def chunk_dense_coords(block: np.ndarray, basis: Basis, coords_of: str | None,
                       divisor: torch.Tensor) -> torch.Tensor:
    """Rows x V x T x K float32 coordinates (unscaled) of a patch cache's ``block`` (module docstring)."""
    x = _float32(block)  # rows x V x T x D
    if coords_of is not None:
        return x[..., :basis.k] / divisor
    if basis.name == RAW:
        return x[..., :basis.k]
    return basis.project(x)  # every token of the chunk at once, in float32


def load_targets(store: Store, store_rows: np.ndarray, basis: Basis, progress: bool = True) -> np.ndarray:
    """The K-dim targets of ``store_rows`` for every view: len(rows) x V x K float32.

    Read chunk by chunk; from ``bases/<name>/coords`` when stored (first K
    columns), else projected from ``features``.
    """
    source, use_coords = target_source(store, basis)
    arr = store[source]
    n_rows, views = int(arr.shape[0]), int(arr.shape[1])
    k = basis.k
    chunk = read_chunk_rows(store)
    out = np.empty((len(store_rows), views, k), np.float32)
    order = np.argsort(store_rows, kind="stable")
    srt = store_rows[order]
    what = "coords" if use_coords else ("raw features" if basis.name == RAW else "features")
    show = None if progress and -(-n_rows // chunk) >= 8 else False
    for c in iter_feature_chunks(store, desc=f"targets ({what})", chunk_ids=np.unique(store_rows // chunk),
                                 ok=np.ones(n_rows, bool), array=source, progress=show):
        start, stop = c.start, c.stop
        lo, hi = np.searchsorted(srt, start), np.searchsorted(srt, stop)
        items = order[lo:hi]
        out[items] = chunk_targets(c.x[store_rows[items] - start], basis, use_coords)
    if not np.isfinite(out).all():
        raise StoreError(f"cache {store.path}: the targets contain NaN or Inf ({what})")
    log.info("targets: %d rows x %d views x %d coords from %s", len(store_rows), views, k, what)
    return out


def load_dense_targets(store: Store, store_rows: np.ndarray, basis: Basis, coords_of: str | None = None,
                       dense: bool = True, pooled: bool = False, progress: bool = True
                       ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(dense targets len(rows) x V x T x K float16 or None, pooled targets len(rows) x V x K float32 or None)
    of a patch cache, read chunk by chunk (module docstring); ``dense``/``pooled`` say which are wanted."""
    arr = store["features"]
    n_rows, views, tokens = int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2])
    k = basis.k
    if coords_of is not None and arr.shape[3] < k:
        raise StoreError(f"cache {store.path} holds {arr.shape[3]} coordinates per token; need {k}")
    chunk = read_chunk_rows(store)
    out = np.empty((len(store_rows), views, tokens, k), np.float16) if dense else None
    mean = np.empty((len(store_rows), views, k), np.float32) if pooled else None
    order = np.argsort(store_rows, kind="stable")
    srt = store_rows[order]
    what = f"{coords_of} coords" if coords_of else ("raw tokens" if basis.name == RAW else "tokens")
    divisor = torch.from_numpy(basis.scale().astype(np.float32))
    show = None if progress and -(-n_rows // chunk) >= 8 else False
    for c in iter_feature_chunks(store, desc=f"dense targets ({what})", chunk_ids=np.unique(store_rows // chunk),
                                 ok=np.ones(n_rows, bool), progress=show):
        lo, hi = np.searchsorted(srt, c.start), np.searchsorted(srt, c.stop)
        items = order[lo:hi]
        coords = chunk_dense_coords(c.x[store_rows[items] - c.start], basis, coords_of, divisor)
        if not torch.isfinite(coords).all():
            raise StoreError(f"cache {store.path}: the dense targets contain NaN or Inf ({what})")
        if out is not None:
            out[items] = coords.numpy().astype(np.float16)
        if mean is not None:
            mean[items] = coords.mean(2).numpy()
    log.info("dense targets: %d rows x %d views x %d tokens x %d coords from %s", len(store_rows), views,
             tokens, k, what)
    return out, mean


def mean_square(targets: np.ndarray, block: int = 4096) -> float:
    """The mean of ``targets ** 2`` (any shape, any float dtype), in float64, ``block`` rows at a time."""
    total = sum(float(np.square(targets[i:i + block], dtype=np.float64).sum())
                for i in range(0, len(targets), block))
    return total / max(1, targets.size)


def scale_targets(targets: np.ndarray, scale: float, block: int = 4096) -> None:
    """``targets /= scale`` in place, ``block`` rows at a time (float16 targets stay float16)."""
    for i in range(0, len(targets), block):
        targets[i:i + block] = (targets[i:i + block].astype(np.float32) / np.float32(scale)).astype(targets.dtype)


TARGET_NORMS = ("global", "none")


def target_scale(basis: Basis, targets: np.ndarray | None, norm: str = "global",
                 mean_sq: float | None = None) -> float:
    """One divisor for all targets: sqrt of the mean variance of the K coordinates (``global``), or 1.

    The variance comes from the basis (its eigenvalues, / eigenvalue when
    whitened, i.e. 1), so cached and live (online) targets get the same scale;
    only the raw features of fitnet without a stored identity basis use the
    targets' mean square. It makes lambda independent of the teacher's feature
    scale: predicting 0 costs an MSE of 1. It is a rescaling of lambda and of
    the projector, not whitening: the coordinates keep their relative variances.
    """
    if norm == "none":
        return 1.0
    if norm != "global":
        raise TcskdError(f"unknown target normalisation '{norm}' (choose {', '.join(TARGET_NORMS)})")
    if basis.name == RAW:
        if mean_sq is not None:  # the targets' mean square, read from the store (StoreTargets.mean_square)
            var = mean_sq
            return float(np.sqrt(var)) if var > 1e-12 else 1.0
        if targets is None:
            return 1.0
        # Dense (float16, N x V x T x K) targets in blocks; global ones as always.
        var = mean_square(targets) if targets.ndim == 4 else float(np.mean(np.square(targets, dtype=np.float64)))
    else:
        var = float(np.mean(basis.eigenvalues / basis.scale() ** 2))
    return float(np.sqrt(var)) if var > 1e-12 else 1.0


# -- targets read from the store while training ----------------------------------------------------------

TARGET_MODES = ("ram", "store", "auto")
#: ``--targets auto`` keeps the targets in RAM below this size and below RAM_SHARE of the available memory.
RAM_LIMIT_BYTES = 4 << 30
RAM_SHARE = 0.25


def available_ram() -> int:
    """Bytes of memory available now (Linux: MemAvailable; elsewhere the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_target_cache_mb() -> int:
    """``--target-cache-mb`` by default: min(2048, 5 % of the machine's memory) MB per process."""
    total = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return max(16, min(2048, int(0.05 * total) >> 20))


def choose_target_mode(mode: str, ram_bytes: int, available: int | None = None) -> str:
    """``ram`` or ``store`` for ``--targets mode``; ``auto``: ram when the targets take less than RAM_LIMIT_BYTES
    and less than RAM_SHARE of the available memory, else store (logged)."""
    if mode not in TARGET_MODES:
        raise TcskdError(f"unknown --targets '{mode}' (choose {', '.join(TARGET_MODES)})")
    if mode != "auto":
        return mode
    available = available_ram() if available is None else available
    chosen = "ram" if ram_bytes < min(RAM_LIMIT_BYTES, RAM_SHARE * available) else "store"
    log.info("--targets auto: %s (the targets take %.1f MB in RAM, %.1f MB available)", chosen,
             ram_bytes / 2 ** 20, available / 2 ** 20)
    return chosen


class StoreTargets:
    """The targets of ``store_rows`` read from the store chunk by chunk as training asks for them, indexed like
    the array the ram path holds: ``t[idx, views]`` -> len(idx) x K (``global``, ``pooled``: float32) or
    len(idx) x T x K (``dense``: float16), equal bit for bit to the ram path's (the same rows of a chunk go
    through the same functions, :func:`chunk_targets` / :func:`chunk_dense_coords`, then the same division).

    Each process (each DataLoader worker) keeps a :class:`~tcskd.store.chunks.ChunkLRU` of the chunks' targets
    (only the rows trained on, scaled), at most ``budget_bytes``. ``scale`` is set by the caller once known
    (:meth:`mean_square` reads every chunk once for the scales that come from the data).
    """

    def __init__(self, store: Store, store_rows: np.ndarray, basis: Basis, kind: str = "global",
                 coords_of: str | None = None, budget_bytes: int = 256 << 20) -> None:
        if kind not in ("global", "dense", "pooled"):
            raise ValueError(f"unknown target kind {kind}")
        self.kind, self.basis, self.coords_of = kind, basis, coords_of
        self.store_rows = np.asarray(store_rows, np.int64)
        if kind == "global":
            self.array, self.use_coords = target_source(store, basis)
        else:
            self.array, self.use_coords = "features", False
            if coords_of is not None and store["features"].shape[3] < basis.k:
                raise StoreError(f"cache {store.path} holds {store['features'].shape[3]} coordinates per token; "
                                 f"need {basis.k}")
        arr = store[self.array]
        n_rows, views = int(arr.shape[0]), int(arr.shape[1])
        self.chunk_rows = read_chunk_rows(store)
        self.shape = ((len(self.store_rows), views, int(arr.shape[2]), basis.k) if kind == "dense"
                      else (len(self.store_rows), views, basis.k))
        self.dtype = np.dtype(np.float16 if kind == "dense" else np.float32)
        self.scale = 1.0
        self._divisor = torch.from_numpy(basis.scale().astype(np.float32))
        order = np.argsort(self.store_rows, kind="stable")
        self._sorted = self.store_rows[order]
        self._item_of_sorted = order
        self.lru = ChunkLRU(store.path, self.array, self.chunk_rows, n_rows, self._process, budget_bytes)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def ram_bytes(self) -> int:
        """What the ram path holds for these targets."""
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one row's targets (every view)."""
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def chunk_ids(self) -> np.ndarray:
        """The store chunk of every item (the block sampler's unit)."""
        return self.store_rows // self.chunk_rows

    def _rows_in(self, c: int) -> np.ndarray:
        """The trained store rows in chunk ``c``, sorted (as the ram path visits them)."""
        lo, hi = np.searchsorted(self._sorted, [c * self.chunk_rows, (c + 1) * self.chunk_rows])
        return self._sorted[lo:hi]

    def _unscaled(self, c: int, x: np.ndarray) -> np.ndarray:
        block = x[self._rows_in(c) - c * self.chunk_rows]
        if self.kind == "global":
            return chunk_targets(block, self.basis, self.use_coords)
        coords = chunk_dense_coords(block, self.basis, self.coords_of, self._divisor)
        if not torch.isfinite(coords).all():
            raise StoreError(f"cache {self.lru.path}: the dense targets contain NaN or Inf (chunk {c})")
        return coords.half().numpy() if self.kind == "dense" else coords.mean(2).numpy()

    def _process(self, c: int, x: np.ndarray) -> np.ndarray:
        t = self._unscaled(c, x)
        if self.kind != "dense" and not np.isfinite(t).all():
            raise StoreError(f"cache {self.lru.path}: the targets contain NaN or Inf (chunk {c})")
        if self.kind == "dense":  # as scale_targets, in torch (the same IEEE roundings, faster in float16)
            return (torch.from_numpy(t).float() / torch.tensor(self.scale, dtype=torch.float32)).half().numpy()
        t /= np.float32(self.scale)
        return t

    def mean_square(self, progress: bool = True) -> float:
        """The mean of the unscaled targets' squares, in float64, every chunk read once (in order)."""
        total, count = 0.0, 0
        ids = np.unique(self.chunk_ids())
        with open_store_of(self.lru.path) as store:
            n_rows = int(store[self.array].shape[0])
            show = None if progress and len(ids) >= 8 else False
            for c in iter_feature_chunks(store, desc="target scale", chunk_ids=ids, ok=np.ones(n_rows, bool),
                                         array=self.array, progress=show):
                t = self._unscaled(c.index, c.x)
                total += float(np.square(t, dtype=np.float64).sum())
                count += t.size
        return total / max(1, count)

    def __getitem__(self, key: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """``targets[idx, views]`` of the ram path's array."""
        idx, views = (np.asarray(k, np.int64) for k in key)
        out = np.empty((len(idx), *self.shape[2:]), self.dtype)
        rows = self.store_rows[idx]
        chunks = rows // self.chunk_rows
        for c in np.unique(chunks):
            sel = np.flatnonzero(chunks == c)
            block = self.lru.get(int(c))
            pos = np.searchsorted(self._rows_in(int(c)), rows[sel])
            out[sel] = block[pos, views[sel]]
        return out


def open_store_of(path: object) -> Store:
    """The store at ``path``, opened for reading."""
    from tcskd.store.backends import open_store

    return open_store(path)


class TorchProjection:
    """``basis.project`` (divided by ``scale``) on a device, for targets computed live (method online)."""

    def __init__(self, basis: Basis, device: torch.device, scale: float = 1.0) -> None:
        self.mean = torch.as_tensor(basis.mean, dtype=torch.float32, device=device)
        self.components = torch.as_tensor(basis.components, dtype=torch.float32, device=device)
        self.scale = torch.as_tensor(basis.scale() * scale, dtype=torch.float32, device=device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) @ self.components.T) / self.scale
