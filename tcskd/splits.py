"""Which rows of a training split a run may use for what: validation, labels, kNN references.

The protocol (one seeded, stratified rule, shared by every stage that reports
accuracy):

- **validation**: a stratified share of the training split (``val_frac``, or
  ``val_per_class`` rows of each class) is held out. A run uses those rows for
  nothing but its validation accuracy: not for CE, not for the mimic term, not
  as kNN references; by default ``tcskd basis`` and the ``tcskd cache --dim K`` token basis leave them out
  of their fit too (``--include-val`` fits on them).
- **labelled rows**: with ``labels_per_class n``, ``n`` rows of each class of
  the remaining (training) rows carry a label; the rest are used for the mimic
  term only. kNN references are exactly the labelled rows.

Segmentation data (image labels -1, per-pixel masks): the images are one
stratum, so ``val_frac`` is a seeded share of the images and ``val_per_class``
a number of images (the same rule for every run seed); :func:`labelled_images`
draws the ``n`` images whose masks CE sees.

Both rules depend only on the rows' labels and ``sample_index`` values (the
sample's position in its source), never on the order in which a store or a
source lists them, so ``tcskd train``, ``tcskd eval`` and ``tcskd basis`` pick
the same rows from the same split. Unlabelled rows (label -1) are a stratum of
their own for the validation split and are never labelled.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tcskd.errors import TcskdError

log = logging.getLogger(__name__)

_VAL_SALT = 7_919_001
_LABEL_SALT = 104_729


@dataclass(frozen=True)
class Holdout:
    """The validation rule: ``val_per_class`` rows per class, else a ``val_frac`` share of each class."""

    val_frac: float = 0.1
    val_per_class: int | None = None
    val_seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.val_frac) and 0.0 <= self.val_frac < 1.0):
            raise TcskdError(f"--val-frac must be in [0, 1) (got {self.val_frac})")
        if self.val_per_class is not None and self.val_per_class < 0:
            raise TcskdError(f"--val-per-class must be >= 0 (got {self.val_per_class})")

    @property
    def empty(self) -> bool:
        return (self.val_per_class == 0) if self.val_per_class is not None else self.val_frac == 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"val_frac": self.val_frac, "val_per_class": self.val_per_class, "val_seed": self.val_seed}

    def mask(self, labels: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
        """Boolean mask of the validation rows among ``labels`` / ``sample_index`` (same length)."""
        labels, sample_index = _check(labels, sample_index)
        out = np.zeros(len(labels), bool)
        if self.empty:
            return out
        rng = np.random.default_rng([int(self.val_seed), _VAL_SALT])
        for c in np.unique(labels):
            rows = _in_source_order(np.flatnonzero(labels == c), sample_index)
            if self.val_per_class is not None:
                n = min(self.val_per_class, len(rows) - 1)
            else:
                n = min(int(round(self.val_frac * len(rows))), len(rows) - 1)
            if n > 0:
                out[rng.permutation(rows)[:n]] = True
        return out


def labelled_mask(labels: np.ndarray, sample_index: np.ndarray, per_class: int | None, seed: int,
                  eligible: np.ndarray | None = None) -> np.ndarray:
    """Rows whose label CE (and the kNN references) may use: every labelled eligible row, or ``per_class``
    of each class among them (seeded by ``seed``)."""
    labels, sample_index = _check(labels, sample_index)
    keep = labels >= 0
    if eligible is not None:
        keep &= np.asarray(eligible, bool)
    if per_class is None:
        return keep
    if per_class < 1:
        raise TcskdError(f"--labels-per-class must be >= 1 (got {per_class})")
    rng = np.random.default_rng([int(seed), _LABEL_SALT])
    out = np.zeros(len(labels), bool)
    for c in np.unique(labels[keep]):
        rows = _in_source_order(np.flatnonzero(keep & (labels == c)), sample_index)
        if len(rows) < per_class:
            log.warning("class %d has only %d labelled training images (< %d per class)", c, len(rows), per_class)
        out[rng.permutation(rows)[:per_class]] = True
    return out


def labelled_images(sample_index: np.ndarray, n: int | None, seed: int,
                    eligible: np.ndarray | None = None) -> np.ndarray:
    """Segmentation: the images whose masks CE may use: every eligible image, or ``n`` of them (seeded by
    ``seed``, drawn as :func:`labelled_mask` draws one class)."""
    sample_index = np.asarray(sample_index, np.int64).reshape(-1)
    if n is not None and n < 1:
        raise TcskdError(f"--labels-per-class must be >= 1 (got {n}; with --task segment it counts images)")
    return labelled_mask(np.zeros(len(sample_index), np.int64), sample_index, n, seed, eligible)


def _check(labels: np.ndarray, sample_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, np.int64).reshape(-1)
    sample_index = np.asarray(sample_index, np.int64).reshape(-1)
    if labels.shape != sample_index.shape:
        raise ValueError(f"labels {labels.shape} and sample_index {sample_index.shape} differ in length")
    return labels, sample_index


def _in_source_order(rows: np.ndarray, sample_index: np.ndarray) -> np.ndarray:
    """``rows`` sorted by their sample_index: the order a permutation is applied to."""
    return rows[np.argsort(sample_index[rows], kind="stable")]


def rows_digest(sample_index: np.ndarray) -> str:
    """A digest of a set of rows (their sample_index values, in any order): two stages that held out
    the same rows have the same digest."""
    return hashlib.sha256(np.sort(np.asarray(sample_index, np.int64)).tobytes()).hexdigest()
