"""``--limit N``: a seeded subset stratified by label (not the first N rows), recorded in the cache identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tcskd.cache.subset import order_rows
import pytest

from tcskd.cache.build import CacheConfig, build_cache, identity_of, plan_cache
from tcskd.cache.subset import LIMIT_RULE, limit_counts, limit_rows, limit_source
from tcskd.store.backends import open_store
from tcskd.data import open_source
from tcskd.errors import TcskdError


def _cfg(root: Path, teacher: str, **kw) -> CacheConfig:
    base = dict(data="builtin:mnist5k", teacher=teacher, cache_root=str(root), image_size=16, limit=512,
                chunk_rows=256, batch_size=128, device="cpu")
    base.update(kw)
    return CacheConfig(**base)


def _rows(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with open_store(path) as s:
        return np.asarray(s.read("sample_index")), np.asarray(s.read("labels")), s.manifest


@pytest.fixture(scope="module")
def mnist_caches(tmp_path_factory, tiny_teacher):
    """--limit 512 caches of builtin:mnist5k (its train split is sorted by class) with seeds 0, 0 again and 1."""
    root = tmp_path_factory.mktemp("limit-caches")
    a = build_cache(_cfg(root, tiny_teacher, seed=0))
    again = build_cache(_cfg(root, tiny_teacher, seed=0))
    b = build_cache(_cfg(root, tiny_teacher, seed=1))
    return a, again, b


def test_limit_512_holds_every_digit_in_proportion(mnist_caches):
    a, _, _ = mnist_caches
    si, labels, m = _rows(a.path)
    src = open_source("builtin:mnist5k", "train")
    assert np.all(np.diff(src.labels) >= 0)  # the split is sorted by class: a prefix would hold two digits
    assert len(si) == 512 and m["n_rows"] == 512
    assert np.array_equal(si, np.sort(si)[order_rows(512)])  # the subset, in the fixed shuffled order
    pos = {int(v): i for i, v in enumerate(src.indices)}
    np.testing.assert_array_equal(labels, src.labels[[pos[int(v)] for v in si]])
    counts = np.bincount(labels, minlength=10)
    share = 512 * np.bincount(src.labels, minlength=10) / len(src)
    assert (counts > 0).all() and counts.sum() == 512
    assert np.abs(counts - share).max() < 1, counts


def test_same_seed_same_rows_other_seed_other_rows_and_key(mnist_caches):
    a, again, b = mnist_caches
    assert again.hit and again.path == a.path
    si_a, _, m_a = _rows(a.path)
    si_b, lab_b, m_b = _rows(b.path)
    assert a.key != b.key
    assert m_a["identity"]["limit"] == {"n": 512, "rule": LIMIT_RULE, "seed": 0}
    assert m_b["identity"]["limit"] == {"n": 512, "rule": LIMIT_RULE, "seed": 1}
    assert len(si_b) == 512 and not np.array_equal(si_a, si_b)
    assert 0 < len(np.intersect1d(si_a, si_b)) < 512
    assert (np.bincount(lab_b, minlength=10) > 0).all()


def test_training_side_reader_matches_limited_rows(mnist_caches):
    from tcskd.train.targets import match_rows

    a, _, _ = mnist_caches
    src = open_source("builtin:mnist5k", "train")
    with open_store(a.path) as s:
        si = np.asarray(s.read("sample_index"))
        src_rows, store_rows = match_rows(s, src, src, limited=True)
    assert len(src_rows) == 512
    np.testing.assert_array_equal(src.indices[src_rows], si[store_rows])
    assert np.all(np.diff(src_rows) > 0)


def test_unlimited_key_does_not_depend_on_the_seed(tiny_teacher, tmp_path):
    teacher_id = {"spec": tiny_teacher}
    ids = [identity_of(_cfg(tmp_path, tiny_teacher, limit=None, seed=s), "fp", teacher_id) for s in (0, 1)]
    assert ids[0] == ids[1] and ids[0]["limit"] is None
    limited = [identity_of(_cfg(tmp_path, tiny_teacher, limit=8, seed=s), "fp", teacher_id) for s in (0, 1)]
    assert limited[0] != limited[1]
    *_, key0, _ = plan_cache(_cfg(tmp_path, tiny_teacher, limit=None, seed=0))
    *_, key1, _ = plan_cache(_cfg(tmp_path, tiny_teacher, limit=None, seed=3))
    assert key0 == key1


def test_limit_counts_largest_remainder_and_one_per_class():
    labels = np.repeat([0, 1, 2], [5, 3, 2])
    strata, take = limit_counts(labels, 5)  # exact shares 2.5, 1.5, 1.0
    assert strata.tolist() == [0, 1, 2] and take.sum() == 5
    assert np.abs(take - 5 * np.array([5, 3, 2]) / 10).max() < 1
    # A class too small for a row by rounding still gets one when N >= the number of classes.
    skewed = np.repeat([-1, 0, 1, 2], [5, 1000, 3, 2])  # -1 (unlabelled) is a stratum of its own
    strata, take = limit_counts(skewed, 4)
    assert strata.tolist() == [-1, 0, 1, 2] and take.tolist() == [1, 1, 1, 1]
    strata, take = limit_counts(skewed, 50)
    assert take.sum() == 50 and (take >= 1).all() and take[1] == 47
    # Fewer rows than classes: the largest shares win.
    _, take = limit_counts(skewed, 2)
    assert take.sum() == 2 and take[1] >= 1
    for n in range(1, len(skewed)):
        _, take = limit_counts(skewed, n)
        assert take.sum() == n and (take <= np.bincount(skewed + 1)).all()


def test_limit_rows_seeded_sorted_and_whole_split():
    labels = np.repeat(np.arange(4), 25)
    r0, r0b, r1 = limit_rows(labels, 20, 0), limit_rows(labels, 20, 0), limit_rows(labels, 20, 1)
    np.testing.assert_array_equal(r0, r0b)
    assert not np.array_equal(r0, r1)
    assert np.all(np.diff(r0) > 0) and np.bincount(labels[r0]).tolist() == [5, 5, 5, 5]
    np.testing.assert_array_equal(limit_rows(labels, 100, 0), np.arange(100))


def test_limited_source_loads_the_chosen_images(tmp_path):
    from conftest import make_npz

    src = open_source(make_npz(tmp_path / "d.npz", n=40, classes=4), "train")
    sub = limit_source(src, 10, seed=5)
    rows = limit_rows(src.labels, 10, 5)
    np.testing.assert_array_equal(sub.indices, src.indices[rows])
    np.testing.assert_array_equal(sub.labels, src.labels[rows])
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(sub.image(i), src.image(int(r)))
        assert sub.describe(i) == src.describe(int(r))
    np.testing.assert_array_equal(sub.images(np.arange(10)), src.images(rows))
    assert limit_source(src, None, 5) is src and limit_source(src, 40, 5) is src
    with pytest.raises(TcskdError, match="--limit must be >= 1"):
        limit_source(src, 0, 0)
    with pytest.raises(TcskdError, match="--seed must be >= 0"):
        limit_source(src, 5, -1)


def test_limited_source_maps_encoded_bytes_and_masks(tmp_path):
    """Every per-row callable of a source follows the subset: encoded bytes (image files) and masks."""
    from PIL import Image

    from _train_fixtures import make_seg_npz

    root = tmp_path / "f"
    for c in range(3):
        d = root / "train" / f"c{c}"
        d.mkdir(parents=True)
        for j in range(6):
            Image.fromarray(np.full((4, 5, 3), 10 * c + j, np.uint8)).save(d / f"{j}.png")
    src = open_source(f"imagefolder:{root}", "train")
    sub = limit_source(src, 7, seed=1)
    rows = limit_rows(src.labels, 7, 1)
    assert [sub.encoded(i) for i in range(7)] == [src.encoded(int(r)) for r in rows]

    seg = open_source(f"npz:{make_seg_npz(tmp_path / 's.npz', n_train=20, n_test=4)}", "train")
    sub = limit_source(seg, 5, seed=2)
    rows = limit_rows(seg.labels, 5, 2)
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(sub.mask(i), seg.mask(int(r)))
    np.testing.assert_array_equal(sub.masks(np.arange(5)), seg.masks(rows))
