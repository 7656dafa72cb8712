"""Stage 2: streaming moments of the cached features, their bases (PCA, random, identity)."""

from tcskd.store.bases import Basis, load_basis
from tcskd.subspace.config import BasisConfig
from tcskd.subspace.fit import fit_basis
from tcskd.store.moments import Moments, stream_moments

__all__ = ["Basis", "BasisConfig", "Moments", "fit_basis", "load_basis", "stream_moments"]
