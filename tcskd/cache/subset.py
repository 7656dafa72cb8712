"""``tcskd cache --limit N``: a seeded, class-stratified subset of a split, in source order.

The rule is recorded in the cache identity (:data:`LIMIT_RULE`), so a changed rule is a new cache.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tcskd.data import Source
from tcskd.errors import TcskdError

#: How ``--limit N`` picks its rows (recorded in the cache identity).
LIMIT_RULE = "stratified/1"
LIMIT_SEED_SALT = 0x6C696D  # keeps the subset's draws apart from other uses of the same --seed


def limit_counts(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(strata, rows per stratum) of a ``--limit n`` subset: each label (-1, unlabelled, is a stratum of its
    own) gets its share of ``n`` by largest-remainder rounding (ties to the smaller label), so the counts sum
    to ``n`` exactly and each is within 1 of ``n * count / len(labels)``. With ``n`` >= the number of
    strata, every stratum gets a row: one rounded down to none takes one from the most over-served stratum
    (which may then fall more than 1 below its share, on very unbalanced labels only)."""
    strata, counts = np.unique(np.asarray(labels, np.int64), return_counts=True)
    exact = n * counts / counts.sum()
    take = np.floor(exact).astype(np.int64)
    short = n - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:short]] += 1
    if n >= len(strata):
        for s in np.flatnonzero(take == 0):
            donors = np.flatnonzero(take > 1)
            take[donors[np.argmax((take - exact)[donors])]] -= 1
            take[s] = 1
    return strata, take


def limit_rows(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Rows (ascending) of the seeded, stratified ``--limit n`` subset of a split with these labels."""
    labels = np.asarray(labels, np.int64)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng([LIMIT_SEED_SALT, seed])
    strata, take = limit_counts(labels, n)
    chosen = [rng.choice(np.flatnonzero(labels == s), size=int(k), replace=False)
              for s, k in zip(strata, take) if k]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def limit_source(source: Source, limit: int | None, seed: int = 0) -> Source:
    """The ``--limit`` rows of ``source``: a seeded subset stratified by label, in source order
    (:func:`limit_rows`); the whole split when ``limit`` is None or not below its size."""
    if limit is None:
        return source
    if limit < 1:
        raise TcskdError(f"--limit must be >= 1 (got {limit})")
    if seed < 0:
        raise TcskdError(f"--seed must be >= 0 (got {seed})")
    if limit >= len(source):
        return source
    rows = limit_rows(source.labels, limit, seed)
    load_many, masks, load_mask, encoded = source.load_many, source.masks, source.load_mask, source.encoded
    return replace(source, indices=source.indices[rows], labels=source.labels[rows],
                   load=lambda i: source.load(int(rows[i])),
                   describe=lambda i: source.describe(int(rows[i])),
                   load_many=None if load_many is None else lambda r: load_many(rows[np.asarray(r, np.int64)]),
                   masks=None if masks is None else lambda r: masks(rows[np.asarray(r, np.int64)]),
                   load_mask=None if load_mask is None else lambda i: load_mask(int(rows[i])),
                   encoded=None if encoded is None else lambda i: encoded(int(rows[i])))
