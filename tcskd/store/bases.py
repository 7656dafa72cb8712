"""Bases in a cache: a stored coordinate system, the projection onto it, and its atomic write.

A basis lives in ``bases/<name>/`` of a cache store:
``mean`` [D] float64, ``components`` [K, D] float64 (orthonormal rows),
``eigenvalues`` [K] float64, ``explained_ratio`` [K] float64 (cumulative share
of the total variance), optional ``coords`` [N, V, K] float16, and attributes
``kind`` (pca | random | identity), ``k``, ``whiten``, ``view``, ``fit_on``
(key of the cache it was fitted on), ``cache_key`` (key of the cache it was
written into: a basis copied into another cache is refused), ``rows_used``,
``total_variance``, ``created`` and ``complete`` (set last: a basis without it
is not visible).

Targets are ``c = B (x - mu)``, divided by ``sqrt(lambda)`` when whitened.

Atomic appearance (:func:`write_basis`): arrays are written into the hidden
group ``bases/.tmp-<name>-<pid>``, renamed to ``bases/<name>`` (replacing an
older basis of that name only now) and marked ``complete`` last; hidden
leftovers of killed runs are removed by :func:`remove_leftovers`. Writers of
different bases of one Zarr cache touch disjoint folders (``bases/<name>`` and
their own hidden ones; Zarr writes each file by rename and creates a missing
parent group only if absent, and tcskd consolidates no metadata), so they run
side by side (each holding its :class:`tcskd.store.registry.BasisLock`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from tcskd.errors import StoreError
from tcskd.store.backends import Store
from tcskd.store.manifest import Manifest

log = logging.getLogger(__name__)

WHITEN_EPS = 1e-8


@dataclass
class Basis:
    name: str
    kind: str
    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    explained_ratio: np.ndarray
    whiten: bool
    attrs: dict[str, Any]

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    def truncate(self, k: int | None) -> "Basis":
        """The first ``k`` coordinates (all when ``k`` is None)."""
        if k is None or k == self.k:
            return self
        if not 1 <= k <= self.k:
            raise StoreError(f"basis '{self.name}' has {self.k} components; cannot use {k}")
        return Basis(self.name, self.kind, self.mean, self.components[:k], self.eigenvalues[:k],
                     self.explained_ratio[:k], self.whiten, self.attrs)

    def scale(self) -> np.ndarray:
        """Per-coordinate divisor: sqrt(eigenvalue) when whitened, else 1."""
        if not self.whiten:
            return np.ones(self.k)
        return np.sqrt(np.maximum(self.eigenvalues, WHITEN_EPS))

    def project(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Features [..., D] -> coordinates [..., K] (same library as the input)."""
        if isinstance(x, torch.Tensor):
            mu = torch.as_tensor(self.mean, dtype=torch.float32, device=x.device)
            b = torch.as_tensor(self.components, dtype=torch.float32, device=x.device)
            s = torch.as_tensor(self.scale(), dtype=torch.float32, device=x.device)
            return ((x.float() - mu) @ b.T) / s
        x64 = np.asarray(x, dtype=np.float64)
        return ((x64 - self.mean) @ self.components.T) / self.scale()

    def reconstruct(self, c: np.ndarray) -> np.ndarray:
        """Coordinates [..., K] -> features [..., D] in the span of the basis."""
        return (np.asarray(c, np.float64) * self.scale()) @ self.components + self.mean


def load_basis(store: Store, name: str) -> Basis:
    """Read a complete basis, or raise a StoreError naming what is wrong."""
    if name not in store.bases():
        have = ", ".join(store.bases()) or "none"
        raise StoreError(f"cache {store.path} has no complete basis '{name}' (bases: {have})")
    g = f"bases/{name}"
    attrs = store.attrs(g)
    manifest = Manifest.read(store)
    owner, key = attrs.get("cache_key"), manifest.key
    if owner and key and owner != key:
        raise StoreError(f"basis '{name}' in {store.path} was written into cache {owner}, not this cache ({key}): "
                         f"it was copied from another cache; fit it here with `tcskd basis` "
                         f"(--fit-on fits on another cache's features)")
    mean = store.read(f"{g}/mean").astype(np.float64)
    comps = store.read(f"{g}/components").astype(np.float64)
    eig = store.read(f"{g}/eigenvalues").astype(np.float64)
    ratio = store.read(f"{g}/explained_ratio").astype(np.float64)
    if comps.ndim != 2 or mean.shape != (comps.shape[1],) or eig.shape != (comps.shape[0],):
        raise StoreError(f"basis '{name}' in {store.path} has inconsistent shapes "
                         f"(mean {mean.shape}, components {comps.shape}, eigenvalues {eig.shape})")
    dim = manifest.feature_dim
    if dim is not None and comps.shape[1] != int(dim):
        raise StoreError(f"basis '{name}' has dimension {comps.shape[1]} but the cache's features have {dim}")
    return Basis(name, str(attrs.get("kind", "pca")), mean, comps, eig, ratio,
                 bool(attrs.get("whiten", False)), attrs)


# -- writing -----------------------------------------------------------------

#: The arrays of a basis, in the order they are written.
BASIS_ARRAYS = ("mean", "components", "eigenvalues", "explained_ratio")


def write_basis(store: Store, name: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any],
                fill: Callable[[Store, str], None] | None = None) -> None:
    """Write ``arrays`` (:data:`BASIS_ARRAYS`, float64) as ``bases/<name>`` so that it appears whole or not
    at all; ``fill(store, group)`` adds more to the hidden group first (e.g. the coords)."""
    try:
        store.require_group("bases")
    except Exception:  # created by a writer of another basis at the same moment
        if "bases" not in store:
            raise
    tmp = f"bases/.tmp-{name}-{os.getpid()}"
    if tmp in store:
        store.delete(tmp)
    try:
        store.require_group(tmp)
        k, d = arrays["components"].shape
        for key in BASIS_ARRAYS:
            arr = arrays[key]
            chunks = arr.shape if arr.ndim == 1 else (min(k, max(1, (1 << 22) // d)), d)
            # compressed for the checksum: a damaged basis fails to load instead of giving wrong targets
            a = store.create(f"{tmp}/{key}", arr.shape, "float64", chunks, fill_value=0.0, compress=True)
            a[...] = arr
        if fill is not None:
            fill(store, tmp)
        store.set_attrs({**attrs, "k": int(k), "complete": False}, tmp)
        store.flush()
        publish_group(store, tmp, f"bases/{name}")
    except BaseException:
        discard_group(store, tmp)
        raise


def publish_group(store: Store, tmp: str, final: str) -> None:
    """Rename the finished hidden group into place (replacing an older one), then mark it complete."""
    store.rename(tmp, final)
    store.set_attrs({"complete": True}, final)
    store.flush()


def discard_group(store: Store, tmp: str) -> None:
    """Best effort: remove a half-written group after an error (a killed run leaves it for the next)."""
    try:
        store.delete(tmp)
    except Exception as e:  # the original error matters more
        log.warning("could not remove %s: %s", tmp, e)


def leftover_owner(child: str) -> str | None:
    """The basis name a hidden group of ``bases/`` was written for (``.tmp-<name>-<pid>``, ``.old-<name>-<pid>``),
    None for another name."""
    for prefix in (".tmp-", ".old-"):
        if child.startswith(prefix) and "-" in child[len(prefix):]:
            return child[len(prefix):].rsplit("-", 1)[0]
    return None


def remove_leftovers(store: Store, name: str | None = None) -> None:
    """Delete hidden groups under ``bases/`` left by killed runs.

    ``name=None``: every one, and every temporary file of the store (the caller holds the cache's writer lock,
    nobody else writes). ``name``: only those of basis ``name`` and the temporary files under its folders (the
    caller holds that basis's lock, :class:`tcskd.store.registry.BasisLock`; writers of other bases may be at
    work beside it)."""
    for child in store.children("bases"):
        if child.startswith(".") and (name is None or leftover_owner(child) == name):
            log.warning("removing bases/%s left by an interrupted run", child)
            store.delete(f"bases/{child}")
    if name is None:
        store.remove_partial_files()
    else:
        store.remove_partial_files(f"bases/{name}")
