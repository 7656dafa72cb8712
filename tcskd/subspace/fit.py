"""Stage 2: fit a coordinate system (basis) on a cache's features and store it there.

``fit_basis`` streams float64 moments over ``features`` (or another cache's,
``fit_on``), builds a basis of one of three kinds and writes it as
``bases/<name>/{mean,components,eigenvalues,explained_ratio[,coords]}``
(the contract of :mod:`tcskd.store.bases`):

- ``pca``: eigenvectors of the covariance (``eigh``) or right singular vectors
  of the centred data (``svd``), by decreasing eigenvalue; each component's
  largest-magnitude entry is positive.
- ``random``: the first K rows of a seeded random rotation (QR of a Gaussian);
  its "eigenvalues" are the data's variance along each direction.
- ``identity``: the raw features (mean 0, components I_D, K = D); its
  "eigenvalues" are the per-dimension second moments (FitNet-style targets).

A patch cache (``features`` N x V x T x D) is fitted on its tokens: every token of the chosen views is a
sample. A ``--dim K`` cache (``Manifest.coords_of``) holds coordinates of its own basis, not features: it is
refused in one line (its basis is already in it; fit on a raw patch cache instead), as is ``fit_on`` across a
global and a patch cache.

Validation rows: by default (``exclude_val``) the rows every training run of the same ``--val-*`` options
holds out for validation (tcskd.splits) are left out of the fit, so that no validation row reaches a basis
unless ``--include-val`` asks for it; the basis records the choice (``exclude_val``), the rule
(``holdout``, None when nothing was held out), how many rows (``held_out_count``) and which
(``held_out_rows``, a digest of their sample_index values that training compares with its own). A cache of
another split than train holds no training run's validation rows: nothing is held out there.

``explained_ratio`` is cumulative: the share of ``total_variance`` (the trace
of the covariance; for ``identity`` the summed second moments) in the first k
coordinates. Covariances are unbiased (divided by n - 1).

Atomic appearance (:func:`tcskd.store.bases.write_basis`): arrays are written into the hidden group
``bases/.tmp-<name>-<pid>``, renamed to ``bases/<name>`` (replacing an older
basis of that name only now) and marked ``complete`` last; hidden leftovers
of killed runs are removed by the next writer of that basis (or of any basis whose lock is free). The whole
fit holds the basis's lock (:class:`tcskd.store.registry.BasisLock`): a second writer of the same name is
refused (``wait``: waits), writers of other bases of a Zarr cache run beside it, a writer of the cache itself
is refused meanwhile; readers of the cache take no lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import tcskd
from tcskd import dist
from tcskd.device import resolve_device
from tcskd.errors import StoreError, TcskdError
from tcskd.results import BasisResult
from tcskd.splits import Holdout, rows_digest
from tcskd.store import bases
from tcskd.store.backends import Store, detect_format, open_store
from tcskd.store.bases import WHITEN_EPS
from tcskd.store.chunks import iter_feature_chunks, read_chunk_rows, row_mask
from tcskd.store.integrity import require
from tcskd.store.manifest import Manifest
from tcskd.store.paths import is_remote
from tcskd.store.registry import BasisLock, cache_parent, resolve_cache
from tcskd.subspace.config import BasisConfig
from tcskd.store.moments import (Fitted, Moments, check_finite, fitted_basis, note_rank, pca_of_moments,
                                 raise_if_not_finite, sign_convention, stream_moments)

log = logging.getLogger(__name__)

#: The arrays a fit reads (their chunks must all be stored).
FIT_ARRAYS = ("features", "row_ok")
#: Options that do not change the basis, left out of its recorded config.
NOT_RECORDED = ("plot", "wait")
TOP_EIGENVALUES = 10


# -- the stage ---------------------------------------------------------------

def fit_basis(cfg: BasisConfig) -> BasisResult:
    """Fit the basis ``cfg`` describes, store it in the cache, write its plot; return a summary
    (:class:`tcskd.results.BasisResult`).

    Summary keys: name, kind, k, dim, explained (cumulative share at K), top_eigenvalues,
    total_variance, rows_used, samples, cache, basis (where it is stored), plot (None when not drawn),
    fit_on, seconds, timings: the seconds of ``read`` (the streamed pass over the features that sums the
    moments; with ``method='svd'`` reading and the SVD are one step, counted as compute), ``compute``
    (the decomposition), ``write`` (the basis and its coords) and ``plot``, which sum to at most seconds.
    """
    cfg.validate()
    t0 = time.perf_counter()
    timings = {"read": 0.0, "compute": 0.0, "write": 0.0, "plot": 0.0}
    device = dist.device_for_rank(resolve_device(cfg.device))
    dist.init(device)
    dist.check_shared_root(cache_parent(cfg.cache, cfg.cache_root))  # one folder for every rank (multi-node)
    if dist.world() > 1 and cfg.kind == "pca" and cfg.method == "svd":
        raise TcskdError("--method svd needs every sample in one process: use --method eigh under torchrun")
    cache_dir = resolve_cache(cfg.cache, cfg.cache_root)
    fit_dir = resolve_cache(cfg.fit_on, cfg.cache_root) if cfg.fit_on else cache_dir
    same = fit_dir.resolve() == cache_dir.resolve()
    fit_key = _key_of(fit_dir)
    name = cfg.resolved_name(None if same else fit_key)

    # Under torchrun only rank 0 locks and writes; every rank streams its share of the
    # chunks and the moments are all-reduced (see _moments).
    lock = (BasisLock(cache_dir, name, detect_format(cache_dir) or "zarr", wait=cfg.wait) if dist.is_main()
            else contextlib.nullcontext())
    with _rank0_first(lock):
        store = open_store(cache_dir, "a" if dist.is_main() else "r")
        try:
            src = store if same else open_store(fit_dir, "r")
            try:
                require(store, arrays=FIT_ARRAYS)
                check_fittable(store)
                if not same:
                    require(src, arrays=FIT_ARRAYS)
                    check_fittable(src, store)
                    d_dst, d_src = _dim(store), _dim(src)
                    if d_dst != d_src:
                        raise StoreError(f"--fit-on cache {fit_dir} has {d_src}-dimensional features but "
                                         f"cache {cache_dir} has {d_dst}: a basis must match the features")
                if dist.is_main():
                    remove_leftovers(store, cache_dir, name)
                ok = row_mask(src)
                holdout = cfg.holdout()
                held_out, held_out_count = None, 0
                if holdout is not None:
                    val, held_out = holdout_rows(src, ok, holdout)
                    held_out_count = int(val.sum())
                    ok &= ~val
                    holdout = holdout if held_out is not None else None  # another split: none held out
                else:
                    log.info("--include-val: the training runs' validation rows are fitted on too")
                rows_used = int(ok.sum())
                log.info("fitting %s basis '%s' on %d rows (view %s) of %s on %s", cfg.kind, name,
                         rows_used, cfg.view, fit_dir, device)
                t = time.perf_counter()
                fitted = _fit(src, cfg, device, ok, timings)
                timings["compute"] = time.perf_counter() - t - timings["read"]
            finally:
                if src is not store:
                    src.close()
            attrs = {
                "kind": cfg.kind, "k": fitted.k, "whiten": bool(cfg.whiten), "view": cfg.view,
                "fit_on": fit_key, "fit_on_path": str(fit_dir), "rows_used": rows_used,
                "cache_key": Manifest.read(store).key,
                "samples": fitted.samples, "total_variance": fitted.total_variance,
                "method": cfg.method if cfg.kind == "pca" else None,
                "seed": cfg.seed if cfg.kind == "random" else None,
                "exclude_val": bool(cfg.exclude_val),
                "holdout": holdout.as_dict() if holdout is not None else None, "held_out_rows": held_out,
                "held_out_count": held_out_count,
                "dim_requested": cfg.dim, "energy": cfg.energy, "feature_dim": int(fitted.mean.shape[0]),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "tool_version": tcskd.__version__,
                "config": {**{k: v for k, v in asdict(cfg).items() if k not in NOT_RECORDED}, "name": name,
                           "device": str(device)},
            }
            if dist.is_main():
                t = time.perf_counter()
                write_basis(store, name, fitted, attrs, coords=cfg.coords, whiten=cfg.whiten, device=device,
                            chunk_rows=cfg.chunk_rows)
                timings["write"] = time.perf_counter() - t
            fmt = store.format
        finally:
            store.close()

    plot = cache_dir / f"basis-{name}.png" if cfg.plot else None
    if dist.is_main() and plot is not None:
        t = time.perf_counter()
        _plot(plot, fitted, name)
        timings["plot"] = time.perf_counter() - t
    dist.barrier()
    where = str(cache_dir / "bases" / name) if fmt == "zarr" else f"{cache_dir / 'store.h5'}:/bases/{name}"
    explained = float(fitted.explained_ratio[-1])
    top = [float(v) for v in fitted.eigenvalues[:TOP_EIGENVALUES]]
    summary: BasisResult = {
        "name": name, "kind": cfg.kind, "k": fitted.k, "dim": int(fitted.mean.shape[0]),
        "explained": explained, "top_eigenvalues": top, "total_variance": fitted.total_variance,
        "rows_used": rows_used, "samples": fitted.samples, "cache": str(cache_dir), "basis": where,
        "plot": None if plot is None else str(plot), "fit_on": fit_key,
        "seconds": round(time.perf_counter() - t0, 3), "timings": timings,
    }
    log.info("basis '%s': K=%d of D=%d explains %.4f of the variance; top eigenvalues %s; stored at %s",
             name, fitted.k, summary["dim"], explained, ", ".join(f"{v:.4g}" for v in top[:5]), where)
    return summary


def _key_of(cache_dir) -> str:
    """The cache's key (its manifest's; the folder's name for a cache without one)."""
    with open_store(cache_dir, "r") as s:
        return str(Manifest.read(s).key or cache_dir.name)


def remove_leftovers(store: Store, cache_dir, name: str) -> None:
    """Remove what killed writers left in ``bases/``: of basis ``name`` (whose lock the caller holds), and of any
    other basis whose lock is free now (taken for the moment of the removal). An HDF5 cache has one basis
    lock: everything left there is removed."""
    if store.format == "hdf5":
        bases.remove_leftovers(store)
        return
    bases.remove_leftovers(store, name)
    others = sorted({o for c in store.children("bases") if (o := bases.leftover_owner(c)) and o != name})
    for other in others:
        held = BasisLock.try_basis(cache_dir, other, store.format)
        if held is None:  # being written now
            continue
        try:
            bases.remove_leftovers(store, other)
        finally:
            held.__exit__(None)


# -- checks ------------------------------------------------------------------

def _dim(store: Store) -> int:
    return int(store["features"].shape[-1])


def check_fittable(store: Store, other: Store | None = None) -> None:
    """TcskdError when ``store`` holds coordinates (``tcskd cache --dim K``) rather than features, or when
    ``other`` (the cache the basis goes into) holds another kind of features (token grids vs global)."""
    m = Manifest.read(store)
    if m.coords_of:
        raise TcskdError(f"cache {store.path} already holds coordinates of basis '{m.coords_of}' (built with "
                         f"tcskd cache --dim {m.dim}), not raw features: use that basis, or fit on a raw "
                         f"--tokens patch cache")
    if other is not None and Manifest.read(other).dense != m.dense:
        kinds = {True: "patch tokens", False: "global features"}
        raise TcskdError(f"--fit-on cache {store.path} holds {kinds[m.dense]} but cache {other.path} holds "
                         f"{kinds[Manifest.read(other).dense]}: a basis must match the features")


def holdout_rows(store: Store, ok: np.ndarray, holdout: Holdout) -> tuple[np.ndarray, str | None]:
    """(mask, digest of their sample_index values) of the validation rows (``tcskd.splits``) among the
    usable rows ``ok`` of a cache of the train split. A cache of another split (test, all) holds no training
    run's validation rows: no row (an all-False mask) and digest None, logged."""
    split = Manifest.read(store).split or "train"
    if split != "train":
        log.info("cache %s holds split '%s', not train: no training run's validation rows to leave out; "
                 "fitting on every usable row", store.path, split)
        return np.zeros(len(ok), bool), None
    labels = np.asarray(store.read("labels"), np.int64)
    sample_index = np.asarray(store.read("sample_index"), np.int64)
    out = np.zeros(len(ok), bool)
    out[ok] = holdout.mask(labels[ok], sample_index[ok])
    log.info("leaving out %d validation rows (%s)", int(out.sum()), holdout.as_dict())
    return out, rows_digest(sample_index[out])


# -- fitting -----------------------------------------------------------------

def _fit(src: Store, cfg: BasisConfig, device: torch.device, ok: np.ndarray,
         timings: dict[str, float] | None = None) -> Fitted:
    """The basis of ``cfg`` fitted on ``src``'s usable rows ``ok``; ``timings["read"]`` gets the moments' pass."""
    d = _dim(src)
    if cfg.dim is not None and cfg.dim > d:
        raise TcskdError(f"--dim {cfg.dim} exceeds the feature dimension {d}")
    if cfg.kind == "identity" and cfg.dim not in (None, d):
        raise TcskdError(f"an identity basis keeps every dimension (K = D = {d}): drop --dim or use --dim {d}")
    if cfg.kind == "pca" and cfg.method == "svd":
        return _fit_pca_svd(src, cfg, device, ok)
    t = time.perf_counter()
    mom = _moments(src, cfg, device, ok)
    if timings is not None:
        timings["read"] = time.perf_counter() - t
    if mom.n < 2:
        raise StoreError(f"cache {src.path} has {mom.n} usable sample(s); a basis needs at least 2")
    if cfg.kind == "pca":
        return _fit_pca_eigh(mom, cfg)
    if cfg.kind == "random":
        return _fit_random(mom, cfg)
    return _fit_identity(mom)


def _moments(src: Store, cfg: BasisConfig, device: torch.device, ok: np.ndarray) -> Moments:
    """The moments of every usable sample; under torchrun each rank reads every
    world-th chunk and the sums are all-reduced, so every rank holds the total."""
    if dist.world() == 1:
        return stream_moments(src, cfg.view, device, cfg.chunk_rows, ok=ok)
    rows = int(src["features"].shape[0])
    step = read_chunk_rows(src, cfg.chunk_rows)
    ids = list(range(-(-rows // step)))[dist.rank()::dist.world()]
    mom = stream_moments(src, cfg.view, device, cfg.chunk_rows, chunk_ids=ids, ok=ok, check=False)
    mom.all_reduce()  # first, so that every rank sees the same sums and fails alike on NaN/Inf
    raise_if_not_finite(mom, src, cfg.chunk_rows, ids, ok)
    return mom


@contextlib.contextmanager
def _rank0_first(lock: Any):
    """Enter ``lock`` on rank 0; the other ranks learn whether that worked before going on."""
    error, own = None, None
    try:
        lock.__enter__()
    except TcskdError as e:
        error, own = str(e), e
    error = dist.broadcast_object(error)
    if error:
        raise own if own is not None else TcskdError(error)  # rank 0 keeps the error's type (exit code)
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _fit_pca_eigh(mom: Moments, cfg: BasisConfig) -> Fitted:
    return pca_of_moments(mom, lambda spectrum, total: _choose_k(spectrum, total, cfg))


def _fit_pca_svd(src: Store, cfg: BasisConfig, device: torch.device, ok: np.ndarray) -> Fitted:
    d = _dim(src)
    shape = src["features"].shape  # N x V x D, or N x V x T x D: every token a sample
    n = int(ok.sum()) * (int(shape[1]) if cfg.view == "all" else 1) * (int(shape[2]) if len(shape) == 4 else 1)
    need = n * d * 8 * 3  # data, centred copy / U, workspace
    avail = _available_bytes(device)
    if need > avail:
        raise TcskdError(f"--method svd needs about {need / 2**30:.1f} GiB on {device} for {n} x {d} samples "
                         f"but about {avail / 2**30:.1f} GiB is free: use --method eigh")
    data = torch.empty(n, d, dtype=torch.float64, device=device)
    filled = 0

    def keep(s: torch.Tensor) -> None:
        nonlocal filled
        data[filled:filled + s.shape[0]] = s.to(torch.float64)
        filled += s.shape[0]

    mom = stream_moments(src, cfg.view, device, cfg.chunk_rows, on_samples=keep, ok=ok)
    if filled != n or mom.n != n:
        raise StoreError(f"cache {src.path}: expected {n} usable samples, read {filled}")
    if n < 2:
        raise StoreError(f"cache {src.path} has {n} usable sample(s); a basis needs at least 2")
    mean = mom.mean()
    data -= mean
    _, s, vh = torch.linalg.svd(data, full_matrices=False)
    del data
    evals = s ** 2 / (n - 1)
    spectrum = np.zeros(d)
    spectrum[: evals.shape[0]] = evals.cpu().numpy()
    total = float(spectrum.sum())
    avail_k = int(vh.shape[0])
    if cfg.dim is not None and cfg.dim > avail_k:
        raise TcskdError(f"--method svd yields {avail_k} components for {n} samples; --dim {cfg.dim} needs "
                         f"--method eigh")
    k = min(_choose_k(spectrum, total, cfg), avail_k)
    note_rank(k, n)
    return fitted_basis("pca", mean, sign_convention(vh[:k]), spectrum, total, k, n)


def _fit_random(mom: Moments, cfg: BasisConfig) -> Fitted:
    d = mom.dim
    rotation = random_rotation(d, cfg.seed).to(mom.device)
    cov = mom.covariance()
    variances = ((rotation @ cov) * rotation).sum(1).clamp_min(0).cpu().numpy()
    total = float(torch.diagonal(cov).sum().item())
    k = _choose_k(variances, total, cfg)
    return fitted_basis("random", mom.mean(), rotation[:k], variances, total, k, mom.n)


def _fit_identity(mom: Moments) -> Fitted:
    d = mom.dim
    second = mom.second_moment().clamp_min(0).cpu().numpy()
    total = float(second.sum())
    eye = torch.eye(d, dtype=torch.float64)
    return fitted_basis("identity", torch.zeros(d, dtype=torch.float64), eye, second, total, d, mom.n)


def random_rotation(d: int, seed: int) -> torch.Tensor:
    """A seeded D x D orthonormal matrix (rows), the same on every device: QR of a Gaussian.

    Its first K rows equal those obtained from a D x K Gaussian with the same seed's
    leading columns, so smaller K gives a nested basis.
    """
    g = torch.Generator().manual_seed(int(seed))
    gauss = torch.randn(d, d, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    return (q * signs).T.contiguous()


def _choose_k(spectrum: np.ndarray, total: float, cfg: BasisConfig) -> int:
    d = len(spectrum)
    if cfg.dim is not None:
        return int(cfg.dim)
    if cfg.energy is None:
        return d
    ratio = np.cumsum(spectrum) / total if total > 0 else np.ones(d)
    reach = np.flatnonzero(ratio >= cfg.energy - 1e-12)
    return int(reach[0]) + 1 if len(reach) else d


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


# -- writing -----------------------------------------------------------------

def write_basis(store: Store, name: str, fitted: Fitted, attrs: dict[str, Any], coords: bool = False,
                whiten: bool = False, device: torch.device | str = "cpu", chunk_rows: int | None = None) -> None:
    """Write ``fitted`` as ``bases/<name>`` so that it appears whole or not at all (tcskd.store.bases)."""
    arrays = {"mean": fitted.mean, "components": fitted.components, "eigenvalues": fitted.eigenvalues,
              "explained_ratio": fitted.explained_ratio}

    def fill(s: Store, group: str) -> None:
        write_coords(s, group, fitted, whiten, torch.device(device), chunk_rows)

    bases.write_basis(store, name, arrays, attrs, fill if coords else None)


def write_coords(store: Store, group: str, fitted: Fitted, whiten: bool, device: torch.device,
                  chunk_rows: int | None) -> None:
    """coords [N, V, K] (a patch cache: [N, V, T, K]) float16 = (x - mean) B^T (/ sqrt(eigenvalue)), chunk by
    chunk on ``device``."""
    feats = store["features"]
    n, *mid = (int(s) for s in feats.shape[:-1])
    k = fitted.k
    ch = int(Manifest.read(store).chunk_rows or read_chunk_rows(store, chunk_rows))
    out = store.create(f"{group}/coords", (n, *mid, k), "float16", (ch, *mid, k), fill_value=0)
    f64 = dict(dtype=torch.float64, device=device)
    mean = torch.as_tensor(fitted.mean, **f64)
    comps_t = torch.as_tensor(fitted.components, **f64).T.contiguous()
    scale = (torch.as_tensor(np.sqrt(np.maximum(fitted.eigenvalues, WHITEN_EPS)), **f64) if whiten
             else torch.ones(k, **f64))
    overflow = 0
    for chunk in iter_feature_chunks(store, chunk_rows, desc="coords"):
        x = torch.from_numpy(np.ascontiguousarray(chunk.x)).to(device, non_blocking=True)
        ok = torch.from_numpy(chunk.ok).to(device)
        if chunk.ok.any():
            check_finite(store, chunk, x[ok])
        c = ((x.to(torch.float64) - mean) @ comps_t) / scale
        c[~ok] = 0
        c16 = c.to(torch.float16)
        overflow += int((~torch.isfinite(c16)).sum().item())
        out[chunk.start:chunk.stop] = c16.cpu().numpy()
    if overflow:
        log.warning("%d coordinate value(s) overflow float16 (|c| > 65504) and are stored as inf", overflow)


# -- plot --------------------------------------------------------------------

def _plot(path: Path, fitted: Fitted, name: str) -> None:
    """Scree (eigenvalues, log scale) and cumulative explained variance, K marked; atomic write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spec = fitted.spectrum
    idx = np.arange(1, len(spec) + 1)
    ratio = np.minimum(np.cumsum(spec) / fitted.total_variance, 1.0)
    k = fitted.k
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    positive = spec > 0
    label = {"pca": "eigenvalue", "random": "variance along direction", "identity": "second moment"}[fitted.kind]
    ax1.semilogy(idx[positive], spec[positive], ".-", ms=3, lw=1)
    ax1.axvline(k, color="tab:red", ls="--", lw=1, label=f"K = {k}")
    ax1.set_xlabel("coordinate")
    ax1.set_ylabel(label)
    ax1.set_title(f"scree: {name} ({fitted.kind})")
    ax1.legend()
    ax2.plot(idx, ratio, "-", lw=1.5)
    ax2.axvline(k, color="tab:red", ls="--", lw=1)
    ax2.axhline(ratio[k - 1], color="tab:gray", ls=":", lw=1)
    ax2.annotate(f"{ratio[k - 1]:.3f} at K={k}", (k, ratio[k - 1]), textcoords="offset points", xytext=(6, -14))
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("number of coordinates")
    ax2.set_ylabel("cumulative explained variance")
    ax2.set_title("cumulative variance")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=0.9, wspace=0.28)
    if is_remote(path):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        path.write_bytes(buf.getvalue())
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
