"""``tcskd cache --order``: rows written in a seeded random order (the default where any row reads at the same
cost) or in source order; the same features per sample either way, every chunk a random sample of the split,
old source-order keys kept, and training that reads targets from the store mixing every class in a window."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tcskd.cache.build import build_cache
from tcskd.cache.config import CacheConfig
from tcskd.cache.subset import class_runs, order_rows, resolve_order
from tcskd.errors import TcskdError
from tcskd.store.backends import open_store
from tcskd.store.manifest import Manifest
from tcskd.train.inputs import window_class_share


def _class_ordered_npz(path, per_class: int = 16, classes: int = 4, size: int = 12) -> str:
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(classes), per_class)           # one class after another, as an image folder lists them
    x = rng.integers(0, 256, (len(y), size, size), dtype=np.uint8)
    np.savez(path, x=x, y=y, x_test=x[:4], y_test=y[:4])
    return f"npz:{path}"


@pytest.mark.parametrize("spec,auto", [("builtin:mnist5k", "shuffled"), ("npz:/d.npz", "shuffled"),
                                       ("imagefolder:/data", "shuffled"), ("cifar100:/c", "shuffled"),
                                       ("wds:/shards", "source"), ("hfds:/ds", "source"),
                                       ("wds:s3://bucket/shards", "source")])
def test_auto_shuffles_unless_the_kind_reads_fastest_in_its_own_order(spec, auto):
    assert resolve_order("auto", spec) == auto
    assert resolve_order("source", spec) == "source" and resolve_order("shuffled", spec) == "shuffled"


def test_an_unknown_order_is_one_line():
    with pytest.raises(TcskdError, match="unknown --order 'random'"):
        CacheConfig(order="random").validate()


def test_the_permutation_is_a_pure_function_of_n():
    a = order_rows(1000)
    assert np.array_equal(np.sort(a), np.arange(1000))
    assert np.array_equal(a, order_rows(1000))
    assert not np.array_equal(a, np.arange(1000))
    assert not np.array_equal(order_rows(999), a[:999])


def test_class_runs():
    assert class_runs(np.repeat(np.arange(4), 5)) == pytest.approx(16 / 19)
    assert class_runs(np.array([0, 1, 0, 1, -1, 1])) == pytest.approx(1 / 4)  # the unlabelled row left out
    assert class_runs(np.array([0, 1, 0, 1, 0])) == 0.0
    assert class_runs(np.array([3])) == 0.0


def test_shuffled_and_source_caches_hold_the_same_features_per_sample(tmp_path, tiny_teacher, caplog):
    data = _class_ordered_npz(tmp_path / "d.npz")
    base = dict(data=data, teacher=tiny_teacher, image_size=16, chunk_rows=16, batch_size=8, device="cpu",
                workers=0, cache_root=str(tmp_path / "caches"), views=2)
    with caplog.at_level(logging.WARNING, logger="tcskd.cache.build"):
        shuffled = build_cache(CacheConfig(**base))
    assert "class order" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="tcskd.cache.build"):
        source = build_cache(CacheConfig(**base, order="source"))
    assert "class order (95.2 % of neighbouring rows share a label)" in caplog.text  # 60 of 63 pairs
    assert shuffled.key != source.key
    a, b = open_store(shuffled.path, "r"), open_store(source.path, "r")
    si_a, si_b = np.asarray(a.read("sample_index")), np.asarray(b.read("sample_index"))
    assert np.array_equal(si_b, np.arange(64))                          # source order: row r is sample r
    assert np.array_equal(si_a, order_rows(64))                      # shuffled: the seeded permutation
    # every sample's features, labels and view boxes are the same whichever row holds it
    ia, ib = np.argsort(si_a), np.argsort(si_b)
    for name in ("features", "view_params", "labels"):
        fa, fb = np.asarray(a.read(name))[ia], np.asarray(b.read(name))[ib]
        assert np.array_equal(fa, fb), name
    # source order: each chunk of 16 rows is one class; shuffled: every chunk holds at least 3 of the 4
    lab_a, lab_b = np.asarray(a.read("labels")), np.asarray(b.read("labels"))
    assert [len(np.unique(lab_b[c:c + 16])) for c in range(0, 64, 16)] == [1, 1, 1, 1]
    assert min(len(np.unique(lab_a[c:c + 16])) for c in range(0, 64, 16)) >= 3
    chunk_of = np.arange(64) // 16
    assert window_class_share(lab_b, chunk_of, 1) == 0.25
    assert window_class_share(lab_a, chunk_of, 1) >= 0.75
    assert Manifest.read(a).identity["order"] == "permutation/1"
    assert "order" not in Manifest.read(b).identity


def test_shards_of_a_shuffled_cache_equal_one_process(tmp_path, tiny_teacher):
    data = _class_ordered_npz(tmp_path / "d.npz")
    base = dict(data=data, teacher=tiny_teacher, image_size=16, chunk_rows=16, batch_size=8, device="cpu",
                workers=0)
    one = build_cache(CacheConfig(**base, cache_root=str(tmp_path / "one")))
    for i in (1, 0):
        res = build_cache(CacheConfig(**base, cache_root=str(tmp_path / "two"), shard=f"{i}/2"))
    assert res.key == one.key
    a, b = open_store(one.path, "r"), open_store(res.path, "r")
    for name in ("features", "sample_index", "labels", "view_params", "row_ok"):
        assert np.array_equal(np.asarray(a.read(name)), np.asarray(b.read(name))), name
