"""A stored coordinate system and the projection of features onto it.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tcskd.cache.store import Store
from tcskd.errors import StoreError

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
    owner, key = attrs.get("cache_key"), store.manifest.get("key")
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
    dim = store.manifest.get("dim")
    if dim is not None and comps.shape[1] != int(dim):
        raise StoreError(f"basis '{name}' has dimension {comps.shape[1]} but the cache's features have {dim}")
    return Basis(name, str(attrs.get("kind", "pca")), mean, comps, eig, ratio,
                 bool(attrs.get("whiten", False)), attrs)
