"""Dense caches (``tcskd cache --tokens patch``): a grid of teacher tokens per view, raw or as K PCA coordinates.

A patch cache stores ``features`` N x V x T x D, the T = Gh * Gw tokens of
``Teacher.token_map`` in row-major order (tcskd.store.layout). With ``--dim K``
raw tokens never reach the disk:

1. pass 1 (:func:`prepare_projection`): the tokens of every view of a seeded
   sample of ``--basis-sample`` images stream into float64 moments
   (tcskd.store.moments; O(D^2) memory); their PCA basis (eigh, K
   components) is written into the new store as ``bases/pca`` before any chunk
   (or ``--basis-from`` copies another patch cache's basis there). The sample
   is drawn from the rows training runs do not hold out for validation
   (``--exclude-val``, the default, with ``--val-frac`` / ``--val-per-class`` /
   ``--val-seed`` as in ``tcskd train``: :class:`tcskd.splits.Holdout`, which
   depends only on labels and sample_index values), so no validation row
   reaches the basis; the basis records the rows left out (``held_out_rows``,
   as ``tcskd basis`` does) and the rule is part of the cache key (only where
   it leaves rows out: ``--include-val``, a test split or an empty rule keep
   the key a sample of every row has);
2. pass 2 (tcskd.cache.build): every chunk holds each token's first K
   coordinates ``B (x - mean)`` (unwhitened; ``Manifest.coords_of = "pca"``).

A resumed run finds the basis in the store and only finishes the chunks. Under
torchrun the ranks split the sample and all-reduce the moments; rank 0 writes
the basis. :func:`bytes_per_image` gives the storage cost of a configuration.
"""

from __future__ import annotations

import datetime as _dt
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch

import tcskd
from tcskd import dist
from tcskd.cache.config import CacheConfig
from tcskd.data import DataError
from tcskd.device import autocast
from tcskd.errors import NoTokensError, StoreError, TcskdError
from tcskd.source import Source
from tcskd.splits import Holdout, rows_digest
from tcskd.store.backends import Store, open_store
from tcskd.store import bases
from tcskd.store.bases import Basis, load_basis, remove_leftovers
from tcskd.store.handle import open_cache
from tcskd.store.layout import bytes_per_image
from tcskd.store.manifest import Manifest
from tcskd.store.moments import Moments, pca_of_moments
from tcskd.views import center_view

if TYPE_CHECKING:  # training imports this package and must never import the teachers (tests/test_train_loop.py)
    from tcskd.teachers import Teacher

log = logging.getLogger(__name__)

#: The basis a ``--dim K`` cache's coordinates are in.
BASIS_NAME = "pca"
#: How the ``--dim`` basis's sample leaves the validation rows out (recorded in the cache key with the rule's
#: options): the rows of :class:`tcskd.splits.Holdout` over the cache's rows are never drawn.
HOLDOUT_RULE = "exclude-val-1"
#: Version of the token extraction (``Teacher.token_map``) recorded in a patch cache's identity.
TOKEN_MAP_VERSION = 1
#: A batch of the sample pass: (rows, views, labels, view params, errors) as the cache stage's loader gives.
Batches = Callable[[list[list[int]]], Iterable[tuple]]


# -- configuration -------------------------------------------------------------

def check_teacher(cfg: CacheConfig, teacher: Teacher) -> None:
    """One-line errors for a dense configuration the teacher cannot serve."""
    if cfg.tokens != "patch":
        return
    if teacher.grid is None:
        raise NoTokensError(f"teacher {teacher.spec} gives no token grid (only a global feature): --tokens patch "
                            f"needs builtin:, hf:, timm: or a hub/torchscript module returning B x D x H x W")
    if cfg.dim is not None and cfg.dim > teacher.dim:
        raise TcskdError(f"--dim {cfg.dim} exceeds the width of teacher {teacher.spec}'s tokens ({teacher.dim})")


def identity_extras(cfg: CacheConfig, teacher: Teacher, basis_from_key: str | None) -> dict[str, Any]:
    """The identity keys of a patch cache ({} for a global one, whose key stays as before)."""
    if cfg.tokens != "patch":
        return {}
    out: dict[str, Any] = {"tokens": "patch", "grid": list(teacher.grid), "token_map": TOKEN_MAP_VERSION}
    if cfg.dim is not None:
        coords: dict[str, Any] = {"basis": BASIS_NAME, "dim": cfg.dim}
        coords.update({"from": basis_from_key} if basis_from_key else {"sample": cfg.basis_sample,
                                                                         "seed": cfg.seed})
        holdout = None if basis_from_key else sample_holdout(cfg)
        if holdout is not None:  # only then: a basis drawn from every row keeps the key it had
            coords["holdout"] = {**holdout.as_dict(), "rule": HOLDOUT_RULE}
        out["coords"] = coords
    return out


def sample_holdout(cfg: CacheConfig) -> Holdout | None:
    """The validation rule left out of the ``--dim`` basis's sample: None with ``--include-val``, on a split
    other than train (no training run holds rows of it out) or when the rule holds out nothing."""
    holdout = Holdout(cfg.val_frac, cfg.val_per_class, cfg.val_seed)
    if not cfg.exclude_val or cfg.split != "train" or holdout.empty:
        return None
    return holdout


def manifest_fields(cfg: CacheConfig, teacher: Teacher) -> dict[str, Any]:
    """The manifest fields of a patch cache (tokens, grid, patch, teacher_dim, dim, coords_of); {} for global."""
    if cfg.tokens != "patch":
        return {}
    grid = teacher.grid
    return {"tokens": "patch", "grid": [int(grid[0]), int(grid[1])], "patch": teacher.image_size / grid[0],
            "teacher_dim": teacher.dim, "dim": cfg.dim or teacher.dim,
            "coords_of": BASIS_NAME if cfg.dim is not None else None}


def describe_bytes(m: Manifest) -> str:
    """``features`` bytes per image of a cache (uncompressed), e.g. '384.0 KB per image (1 view(s) x 256 tokens x
    768 float16)'."""
    n = bytes_per_image(int(m.dim), m.n_tokens, str(m.dtype), int(m.views))
    what = f"{m.n_tokens} tokens x {m.dim}" if m.dense else f"{m.dim}"
    coords = f" coordinates of basis '{m.coords_of}'" if m.coords_of else ""
    return f"{n / 1024:.1f} KB per image ({m.views} view(s) x {what} {m.dtype}{coords})"


# -- --basis-from ----------------------------------------------------------------

def basis_source_key(cfg: CacheConfig, teacher: Teacher) -> str | None:
    """The key of the ``--basis-from`` cache after checking it can give this cache's basis (None without it)."""
    if cfg.basis_from is None:
        return None
    with open_cache(cfg.basis_from, cfg.cache_root, require="open") as src:
        m = src.manifest
        name = _source_basis_name(m)
        if not m.dense:
            raise TcskdError(f"--basis-from {cfg.basis_from} is a global cache (one embedding per view): a dense "
                             f"basis on a global cache cannot project patch tokens")
        if _teacher_of(m.teacher_identity) != _teacher_of(teacher.identity()) or m.feature_dim != teacher.dim:
            raise TcskdError(f"--basis-from {cfg.basis_from} was built by another teacher ({m.teacher_spec}, "
                             f"{m.feature_dim}-d tokens), not {teacher.spec} ({teacher.dim}-d)")
        if name not in src.bases():
            raise TcskdError(f"--basis-from {cfg.basis_from} has no token basis '{name}' (build it with --dim K or "
                             f"fit one with tcskd basis)")
        k = src.basis(name).k
        if cfg.dim is not None and cfg.dim > k:
            raise TcskdError(f"--dim {cfg.dim} exceeds the {k} components of basis '{name}' in --basis-from "
                             f"{cfg.basis_from}")
        return str(m.key)


def _source_basis_name(m: Manifest) -> str:
    return m.coords_of or BASIS_NAME


def _teacher_of(ident: dict[str, Any] | None) -> tuple:
    ident = ident or {}
    return ident.get("spec"), ident.get("weights_sha256"), ident.get("adapter_version")


# -- the forward -------------------------------------------------------------------

class Projector:
    """Tokens [..., D] -> their first K coordinates ``(x - mean) B^T`` [..., K] (float32 on one device)."""

    def __init__(self, basis: Basis, k: int, device: torch.device) -> None:
        self.basis = basis.truncate(k)
        self.mean = torch.as_tensor(basis.mean, dtype=torch.float32, device=device)
        self.components_t = torch.as_tensor(self.basis.components, dtype=torch.float32, device=device).T.contiguous()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens.float() - self.mean) @ self.components_t


def tokens_forward(teacher: Teacher, x: torch.Tensor, device: torch.device,
                   project: Projector | None = None) -> torch.Tensor:
    """uint8 (or [0, 1] float) B x V x C x S x S -> float32 tokens B x V x T x D (or coordinates B x V x T x K
    with ``project``); a deferred batch (images at their own size) is centre-cropped on the device first."""
    b, v = x.shape[:2]
    flat = center_view(x.reshape(b * v, *x.shape[2:]).to(device, non_blocking=True), teacher.image_size)
    with torch.inference_mode(), autocast(device):
        maps = teacher.token_map(flat)
    with torch.inference_mode():
        tokens = maps.float().flatten(2).transpose(1, 2)  # (b v) x T x D, row-major (y, x)
        if project is not None:
            tokens = project(tokens)
    return tokens.reshape(b, v, *tokens.shape[1:])


# -- pass 1: the token basis ----------------------------------------------------------

def sample_rows(n: int, sample: int, seed: int, held_out: np.ndarray | None = None) -> np.ndarray:
    """The rows (sorted) whose tokens fit the basis: every row not ``held_out`` (a mask over the ``n`` rows)
    when they are at most ``sample``, else a seeded draw of ``sample`` of them."""
    eligible = np.arange(n) if held_out is None else np.flatnonzero(~np.asarray(held_out, bool))
    if len(eligible) <= sample:
        return eligible
    return eligible[np.sort(np.random.default_rng(seed).choice(len(eligible), size=sample, replace=False))]


def held_out_rows(cfg: CacheConfig, source: Source) -> np.ndarray | None:
    """The rows of ``source`` (the cache's rows) left out of the basis sample: the validation rows of the
    training runs (:func:`sample_holdout`, decided by labels and sample_index values as training decides
    them), or None."""
    holdout = sample_holdout(cfg)
    if holdout is None:
        why = ("--include-val" if not cfg.exclude_val
               else f"split '{cfg.split}' holds no training run's validation rows" if cfg.split != "train"
               else "the holdout is empty")
        log.info("token basis sample: drawn from every row (%s)", why)
        return None
    return holdout.mask(source.labels, np.asarray(source.indices, np.int64))


def prepare_projection(store: Store | None, path: Any, cfg: CacheConfig, teacher: Teacher, device: torch.device,
                       batches: Batches, source: Source, shared: bool = False) -> Projector | None:
    """The projection of a ``--dim K`` cache (None otherwise), its basis written into ``store`` first when absent.

    ``store`` (at ``path``) is open for writing on rank 0 (None on the other ranks, which read the basis from
    ``path`` once rank 0 wrote it); ``batches(rows)`` yields the cache stage's input batches of those row lists
    of ``source`` (the rows the cache holds; their labels and sample indices decide the held-out rows).
    Collective under torchrun. A stored basis (a resumed run) is used as it is. ``shared``: other processes
    (``--shard``) may be writing chunks, so only a half-written basis is removed, not the temporary files of
    chunk writes (the caller holds the cache-wide lock, which every basis writer takes).
    """
    if cfg.dim is None:
        return None
    if store is not None and shared:
        for child in store.children("bases"):
            if child.startswith("."):
                log.warning("removing bases/%s left by an interrupted run", child)
                store.delete(f"bases/{child}")
    elif store is not None:
        remove_leftovers(store)  # a basis half-written by a killed run (the caller holds the writer lock)
    have = dist.broadcast_object(store is not None and BASIS_NAME in store.bases())
    if not have:
        if cfg.basis_from is not None:
            if store is not None:
                _copy_basis(store, cfg)
        else:
            _fit_sample_basis(store, cfg, teacher, device, batches, source)
        dist.barrier()
    if store is not None:
        basis = load_basis(store, BASIS_NAME)
    else:
        with open_store(path, "r") as s:
            basis = load_basis(s, BASIS_NAME)
    return Projector(basis, int(cfg.dim), device)


def _fit_sample_basis(store: Store | None, cfg: CacheConfig, teacher: Teacher, device: torch.device,
                      batches: Batches, source: Source) -> None:
    """Pass 1: moments of the sample's tokens (each rank its share, all-reduced), PCA, written by rank 0."""
    held_out = held_out_rows(cfg, source)
    rows = sample_rows(len(source), cfg.basis_sample, cfg.seed, held_out)
    if held_out is not None:
        log.info("token basis sample: %d validation row(s) held out (%s)", int(held_out.sum()),
                 sample_holdout(cfg).as_dict())
    bs = cfg.batch_size or (256 if device.type == "cuda" else 32)
    teacher.to(device)
    shift = _shift(teacher, device, batches, int(rows[0]))
    mom = Moments(teacher.dim, device, shift=shift)
    share = rows[dist.rank()::dist.world()]
    images = 0
    log.info("fitting the token basis on %d sampled image(s) (seed %d)", len(rows), cfg.seed)
    for _, x, _, _, errors in batches([share[i:i + bs].tolist() for i in range(0, len(share), bs)]):
        ok = np.array([not e for e in errors])
        bad = [e for e in errors if e]
        if bad and not cfg.skip_bad:
            raise DataError(bad[0] + " (pass --skip-bad to record and skip such images)")
        if not ok.any():
            continue
        tokens = tokens_forward(teacher, x[torch.from_numpy(ok)], device)
        mom.update(tokens.reshape(-1, tokens.shape[-1]))
        images += int(ok.sum())
    if dist.world() > 1:
        mom.all_reduce()
        images = int(dist.all_reduce_sum(torch.tensor([images], dtype=torch.float64, device=device))[0].item())
    error = None
    if dist.is_main():
        try:
            held_out_index = None if held_out is None else np.asarray(source.indices, np.int64)[held_out]
            _write_sample_basis(store, cfg, mom, images, len(rows), held_out_index)
        except TcskdError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error:
        raise TcskdError(error)


def _shift(teacher: Teacher, device: torch.device, batches: Batches, row: int) -> torch.Tensor | None:
    """The mean token of the first sampled image (every rank computes it: one shift for every share's sums)."""
    for _, x, _, _, errors in batches([[row]]):
        if errors[0]:
            return None
        return tokens_forward(teacher, x, device)[0, 0].double().mean(0)
    return None


def _write_sample_basis(store: Store, cfg: CacheConfig, mom: Moments, images: int, drawn: int,
                        held_out: np.ndarray | None) -> None:
    """The PCA of the sample's moments as ``bases/pca``; ``held_out``: the sample_index values of the rows
    left out of the sample (None: none), recorded as ``tcskd basis`` records them."""
    if not mom.finite():
        raise TcskdError("the teacher gave NaN/Inf tokens on the basis sample; nothing was stored")
    if mom.n < 2:
        raise StoreError(f"the basis sample has {mom.n} usable token(s); a basis needs at least 2")
    fitted = pca_of_moments(mom, int(cfg.dim))
    m = Manifest.read(store)
    attrs = {
        "kind": "pca", "k": fitted.k, "whiten": False, "view": "all", "fit_on": m.key, "fit_on_path": str(store.path),
        "rows_used": images, "samples": fitted.samples, "total_variance": fitted.total_variance, "method": "eigh",
        "seed": cfg.seed, "cache_key": m.key, "dim_requested": cfg.dim, "energy": None,
        "feature_dim": int(fitted.mean.shape[0]), "fitted_on": "sample", "sample_images": images,
        "sample_drawn": drawn, "tokens_per_view": m.n_tokens, "exclude_val": bool(cfg.exclude_val),
        "holdout": sample_holdout(cfg).as_dict() if held_out is not None else None,
        "held_out_rows": rows_digest(held_out) if held_out is not None else None,
        "held_out_count": 0 if held_out is None else int(len(held_out)),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": tcskd.__version__,
    }
    arrays = {"mean": fitted.mean, "components": fitted.components, "eigenvalues": fitted.eigenvalues,
              "explained_ratio": fitted.explained_ratio}
    bases.write_basis(store, BASIS_NAME, arrays, attrs)
    log.info("token basis '%s': K=%d of D=%d explains %.4f of the variance of %d tokens of %d sampled image(s)",
             BASIS_NAME, fitted.k, m.teacher_dim, float(fitted.explained_ratio[-1]), fitted.samples, images)


def _copy_basis(store: Store, cfg: CacheConfig) -> None:
    """``--basis-from``: the other cache's token basis (its first K components) written as this cache's."""
    with open_cache(cfg.basis_from, cfg.cache_root, require="open") as src:
        name = _source_basis_name(src.manifest)
        basis = src.basis(name).truncate(int(cfg.dim))
        src_key = src.manifest.key
    arrays = {"mean": basis.mean, "components": basis.components, "eigenvalues": basis.eigenvalues,
              "explained_ratio": basis.explained_ratio}
    attrs = {**basis.attrs, "cache_key": Manifest.read(store).key, "basis_from": src_key,
             "basis_from_name": name, "complete": False}
    bases.write_basis(store, BASIS_NAME, arrays, attrs)
    log.info("token basis '%s' taken from cache %s (basis '%s', first %d components)", BASIS_NAME, src_key,
             name, basis.k)


__all__ = ["BASIS_NAME", "HOLDOUT_RULE", "Projector", "held_out_rows", "sample_holdout", "bytes_per_image", "check_teacher", "describe_bytes", "identity_extras",
           "manifest_fields", "prepare_projection", "sample_rows", "tokens_forward"]
