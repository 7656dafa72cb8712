"""Which rows a cache holds, in which order: ``tcskd cache --limit N`` (a seeded, class-stratified subset of a
split, in source order) and ``--order`` (the rows written in source order or in a seeded random order).

Both rules are recorded in the cache identity (:data:`LIMIT_RULE`, :data:`ORDER_RULE`), so a changed rule
is a new cache.

Why the order (a fixed seeded permutation of the rows, :func:`order_rows`): training that reads its targets from the store (``tcskd train --targets store``) shuffles
within windows of the chunks its LRU holds (tcskd.train.data.BlockSampler). Sources in class order (every
image folder, sorted by class folder; the built-in digits) then give every chunk one or two classes, and a
window of a few chunks a batch of a few classes: with a 1 MB LRU on the built-in default, val accuracy fell
from 98.7 % to 32.8 %. Rows written in a seeded random order make every chunk a random sample of the split,
so any window mixes every class. The order costs nothing where any row reads as fast as the next (arrays
in memory, one file per image); tar shards and parquet row groups read fastest in their own order, so
``auto`` keeps it for them (tcskd.data.Reader.sequential) and the cache warns when those rows run in class
order. A row's features do not depend on the order but for the float rounding of the batch it was computed in
(each sample's views are seeded by its sample index);
training maps images to rows by ``sample_index``, so a ``ram`` run sees the same batches either way.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tcskd.data import Source, reads_sequentially
from tcskd.errors import TcskdError

#: How ``--limit N`` picks its rows (recorded in the cache identity).
LIMIT_RULE = "stratified/1"
LIMIT_SEED_SALT = 0x6C696D  # keeps the subset's draws apart from other uses of the same --seed
#: How ``--order shuffled`` permutes the rows (recorded in the cache identity).
ORDER_RULE = "permutation/1"
ORDER_SEED = 0x6F7264  # one fixed permutation per row count: --seed (views, --limit) does not change the order
#: ``--order`` choices: auto (shuffled unless the source reads fastest in its own order), shuffled, source.
ORDERS = ("auto", "shuffled", "source")


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


def take_rows(source: Source, rows: np.ndarray) -> Source:
    """The rows ``rows`` of ``source``, in that order, as a Source (each reader function re-indexed)."""
    rows = np.asarray(rows, np.int64)
    load_many, masks, load_mask, encoded = source.load_many, source.masks, source.load_mask, source.encoded
    return replace(source, indices=source.indices[rows], labels=source.labels[rows],
                   load=lambda i: source.load(int(rows[i])),
                   describe=lambda i: source.describe(int(rows[i])),
                   load_many=None if load_many is None else lambda r: load_many(rows[np.asarray(r, np.int64)]),
                   masks=None if masks is None else lambda r: masks(rows[np.asarray(r, np.int64)]),
                   load_mask=None if load_mask is None else lambda i: load_mask(int(rows[i])),
                   encoded=None if encoded is None else lambda i: encoded(int(rows[i])))


def resolve_order(order: str, spec: str) -> str:
    """``shuffled`` or ``source``: ``auto`` is ``source`` for kinds that read rows fastest in their own order
    (tar shards, parquet: :func:`tcskd.data.reads_sequentially`), else ``shuffled``."""
    if order not in ORDERS:
        raise TcskdError(f"unknown --order '{order}' (choose {', '.join(ORDERS)})")
    if order != "auto":
        return order
    return "source" if reads_sequentially(spec) else "shuffled"


def order_rows(n: int) -> np.ndarray:
    """The ``--order shuffled`` permutation of ``n`` rows: row r of the cache holds the split's row
    ``order_rows(n)[r]`` (a pure function of n, the same in every process and shard; not of ``--seed``, so
    that a seed which changes nothing else, one view and no limit, keeps the cache)."""
    return np.random.default_rng(ORDER_SEED).permutation(int(n)).astype(np.int64)


def order_source(source: Source, order: str) -> Source:
    """``source`` with its rows in the resolved ``order`` (``shuffled``: :func:`order_rows`)."""
    if order == "source":
        return source
    if order != "shuffled":
        raise TcskdError(f"unresolved --order '{order}' (resolve_order first)")
    return take_rows(source, order_rows(len(source)))


def class_runs(labels: np.ndarray) -> float:
    """The share of neighbouring labelled rows with the same label (1.0: one class after another; about
    sum_c p_c^2 when the rows are in random order; 0.0 with fewer than two labelled rows)."""
    lab = np.asarray(labels, np.int64)
    lab = lab[lab >= 0]
    return float((lab[1:] == lab[:-1]).mean()) if len(lab) > 1 else 0.0


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
    return take_rows(source, limit_rows(source.labels, limit, seed))
