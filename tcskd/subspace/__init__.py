"""Stage 2: bases (PCA, random, identity) of the cached features, from their streamed moments
(tcskd.store.moments, shared with the cache stage's ``--dim K`` token basis)."""

from tcskd.store.bases import Basis, load_basis
from tcskd.subspace.config import BasisConfig
from tcskd.subspace.fit import fit_basis
from tcskd.store.moments import Moments, stream_moments

__all__ = ["Basis", "BasisConfig", "Moments", "fit_basis", "load_basis", "stream_moments"]
