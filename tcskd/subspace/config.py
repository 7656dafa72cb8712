"""The options of stage 2: ``BasisConfig`` (``tcskd basis``), its choice lists and its one ``validate()``.

Each field is declared once (type, default, choices, CLI help; tcskd.options); the ``tcskd basis`` command
(tcskd.subspace.commands) is generated from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tcskd.device import DEVICES
from tcskd.errors import TcskdError
from tcskd.options import opt
from tcskd.splits import Holdout
from tcskd.store.moments import VIEWS

#: Kinds of basis: principal directions, seeded random orthonormal directions, the raw features.
KINDS = ("pca", "random", "identity")
#: How a pca basis is computed: eigh of the streamed covariance, or an exact SVD of the data in memory.
METHODS = ("eigh", "svd")
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class BasisConfig:
    """What ``tcskd basis`` fits, where from, and where it goes."""

    cache: str = opt(metavar="KEY|PATH", help="Cache that receives the basis (key, unique key prefix, or directory).")
    """The cache that receives the basis: a key (or unique key prefix) under ``cache_root``, or a path."""

    name: str | None = opt(None, help="Basis name (default: the kind, e.g. 'pca').")
    """Basis name inside the cache (``bases/<name>``). Default: the kind, plus ``-whiten``
    when whitened and ``-fit-<key8>`` when fitted on another cache (e.g. ``pca``)."""

    kind: str = opt("pca", choices=KINDS, help="pca | random orthonormal | identity (raw features).")
    """pca (principal directions) | random (seeded random orthonormal directions) |
    identity (raw features, FitNet-style)."""

    dim: int | None = opt(None, metavar="K", help="Number of coordinates (default: all D).")
    """K, the number of coordinates, in [1, D]. Exclusive with ``energy``. Neither: every
    coordinate (K = D, or min(samples, D) for ``method='svd'``)."""

    energy: float | None = opt(None, metavar="E",
                               help="Fewest coordinates explaining this share of the variance, in (0, 1].")
    """E in (0, 1]: the fewest leading coordinates whose cumulative explained variance reaches E."""

    whiten: bool = opt(False, help="Divide targets by sqrt(eigenvalue).")
    """Targets divided by sqrt(eigenvalue) (recorded as an attribute; used by the projection)."""

    fit_on: str | None = opt(None, metavar="KEY|PATH",
                             help="Fit on another cache's features (same dimension); store the basis here.")
    """Fit the moments on another cache (key or path; same feature dimension) and store the
    basis in ``cache``; the basis's ``fit_on`` attribute records that cache's key."""

    view: str = opt("0", choices=VIEWS, help="Fit on view 0 only, or on every view as a separate sample.")
    """Samples to fit on: '0' = view 0 of every row, 'all' = every view as a separate sample. A patch cache
    (``tcskd cache --tokens patch``): every token of those views is a sample; ``coords`` are then N x V x T x K."""

    coords: bool = opt(False, help="Also store the projected targets [N, V, K] (float16).")
    """Also store the projected targets ``bases/<name>/coords`` [N, V, K] float16 for every row and view."""

    device: str = opt("auto", choices=DEVICES)
    """auto | cpu | cuda: where the moments, the decomposition and the projection run."""

    cache_root: str | None = opt(None, help="Default: $TCSKD_CACHE, else ./caches.")
    """Where cache keys are looked up (default: $TCSKD_CACHE, else ./caches)."""

    method: str = opt("eigh", choices=METHODS,
                      help="pca: eigh of the streamed covariance, or exact SVD of the data in memory.")
    """pca only: 'eigh' of the streamed covariance (O(D^2) memory), or 'svd', an exact SVD of
    the centred data held in memory (refused when it does not fit)."""

    seed: int = opt(0, help="Seed of the random basis.")
    """Seed of the random basis (``kind='random'``)."""

    chunk_rows: int | None = opt(None, help="Rows per read (default: the cache's chunk size).")
    """Rows per read (default: the cache's chunk size). The result does not depend on it."""

    exclude_val: bool = opt(True, cli="--exclude-val/--include-val",
                            help="Leave the training runs' validation rows (--val-frac / --val-per-class / "
                                 "--val-seed) out of the fit (default), or fit on them too (--include-val). A cache "
                                 "of another split than train has none: nothing is held out.")
    """Leave the validation rows of the training runs (the seeded, stratified holdout of
    ``tcskd.splits``, chosen by ``val_frac`` / ``val_per_class`` / ``val_seed``) out of the fit: the
    default, so that no validation row reaches a basis unless asked (``--include-val``). The rows are those
    of the cache the basis is fitted on (``fit_on``, else ``cache``); a cache of the test split (or of
    ``all``) holds no training run's validation rows, so nothing is held out there (logged and recorded)."""

    val_frac: float = opt(0.1, help="Share of each class held out, as in tcskd train (unless --include-val).")
    """Unless ``exclude_val`` is off: the share of each class held out (as ``tcskd train --val-frac``)."""

    val_per_class: int | None = opt(None, help="Rows per class held out instead of a share (unless "
                                               "--include-val).")
    """Unless ``exclude_val`` is off: rows per class held out instead of a share (as
    ``tcskd train --val-per-class``)."""

    val_seed: int = opt(0, help="Holdout seed, as in tcskd train (unless --include-val).")
    """Unless ``exclude_val`` is off: the seed of the holdout (as ``tcskd train --val-seed``)."""

    plot: bool = opt(True, help="Draw the scree plot basis-NAME.png beside the cache.")
    """Draw the scree plot ``basis-<name>.png`` beside the cache (not part of the basis: not recorded in it)."""

    wait: bool = opt(False, help="Wait for another writer of the same basis (or of the cache) instead of exiting.")
    """Wait while another process writes the same basis (or the cache itself) instead of exiting with code 3.
    Writers of different bases of one Zarr cache never wait for each other (an HDF5 cache takes one basis
    writer at a time); not recorded in the basis."""

    def holdout(self) -> Holdout | None:
        """The validation rule left out of the fit, or None."""
        return Holdout(self.val_frac, self.val_per_class, self.val_seed) if self.exclude_val else None

    def validate(self) -> None:
        """TcskdError (one line) for an inconsistent configuration."""
        if self.kind not in KINDS:
            raise TcskdError(f"unknown basis kind '{self.kind}' (choose {', '.join(KINDS)})")
        if self.method not in METHODS:
            raise TcskdError(f"unknown method '{self.method}' (choose {', '.join(METHODS)})")
        if self.view not in VIEWS:
            raise TcskdError(f"unknown view '{self.view}' (choose 0 or all)")
        if self.dim is not None and self.energy is not None:
            raise TcskdError("give --dim or --energy, not both")
        if self.dim is not None and self.dim < 1:
            raise TcskdError(f"--dim must be at least 1, got {self.dim}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise TcskdError(f"--energy must be in (0, 1], got {self.energy}")
        if self.kind == "identity" and self.energy is not None:
            raise TcskdError("an identity basis keeps every dimension (K = D): drop --energy")
        self.holdout()  # checks the validation options
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise TcskdError(f"--chunk-rows must be at least 1, got {self.chunk_rows}")
        if self.name is not None and (not _NAME_RE.match(self.name) or len(self.name) > 100):
            raise TcskdError(f"invalid basis name '{self.name}': use letters, digits, '_', '-', '.' "
                             f"and do not start with '.' or '-'")

    def resolved_name(self, fit_key: str | None = None) -> str:
        """``name``, or the default derived from kind, whitening and the fit-on cache's key."""
        if self.name:
            return self.name
        name = self.kind + ("-whiten" if self.whiten else "")
        if fit_key:
            name += f"-fit-{fit_key[:8]}"
        return name


__all__ = ["KINDS", "METHODS", "BasisConfig"]
