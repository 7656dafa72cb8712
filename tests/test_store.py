"""The store layer's conformance suite: one set of tests, run against every backend.

Like zarr-python's store tests: :class:`StoreSuite` holds the tests; each
subclass names a backend (a Zarr directory, an HDF5 file, Zarr over an fsspec
``memory://`` root). Fast: tiny arrays only.
"""

from __future__ import annotations

import shutil
import uuid

import numpy as np
import pytest

from _stores import write_cache
from tcskd.errors import StoreError
from tcskd.store import bases as store_bases
from tcskd.store.backends import detect_format, iter_chunks, open_store
from tcskd.store.bases import load_basis, remove_leftovers, write_basis
from tcskd.store.chunks import iter_feature_chunks, read_chunk_rows
from tcskd.store.handle import open_cache
from tcskd.store.integrity import first_problem
from tcskd.store.layout import REQUIRED, array_specs, create_store
from tcskd.store.manifest import FIELDS, Manifest
from tcskd.store.paths import RemotePath, is_remote
from tcskd.store.registry import cache_key, list_caches, resolve_cache

N, V, D, CH = 50, 2, 6, 16


def _features(seed: int = 0, tokens: int | None = None) -> np.ndarray:
    """N x V x D, or N x V x T x D with ``tokens`` T (a patch cache)."""
    shape = (N, V, D) if tokens is None else (N, V, tokens, D)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _manifest(key_hint: str = "x", tokens: int | None = None) -> Manifest:
    ident = {"hint": key_hint, "data": {"spec": "synthetic"}, "teacher": {"spec": "synthetic"}, "split": "train",
             "views": V, "dtype": "float32"}
    dense = {} if tokens is None else {"tokens": "patch", "grid": [1, tokens], "patch": 16.0, "teacher_dim": D}
    return Manifest.new(key=cache_key(ident), identity=ident, data_spec="synthetic", split="train",
                        teacher_spec="synthetic", n_rows=N, views=V, dim=D, dtype="float32", chunk_rows=CH,
                        num_classes=3, channels=1, image_size=16, complete=False, skipped=[], dense_chunks=True,
                        **dense)


class StoreSuite:
    """The tests every backend passes; a subclass sets ``fmt`` and :meth:`location` (and ``tokens``: a patch
    cache of T tokens per view, ``features`` N x V x T x D)."""

    fmt = "zarr"
    tokens: int | None = None

    @pytest.fixture
    def where(self, tmp_path):
        return self.location(tmp_path)

    def location(self, tmp_path):
        return tmp_path / "cache"

    def cache(self, where, **kw):
        return write_cache(where, _features(tokens=self.tokens), fmt=self.fmt, chunk_rows=CH,
                           labels=np.arange(N) % 3, num_classes=3, **kw)

    def drop_chunk(self, where, name: str, chunk: int) -> None:
        pytest.skip("every chunk of this backend is always allocated")

    # -- layout and manifest -----------------------------------------------
    def test_layout_has_every_array_with_its_spec(self, where):
        m = _manifest(tokens=self.tokens)
        with create_store(where, m, self.fmt) as s:
            assert s.format == self.fmt and detect_format(where) == self.fmt
            for name, (shape, dtype, chunks, fill) in array_specs(m).items():
                arr = s[name]
                assert tuple(arr.shape) == shape and np.dtype(arr.dtype) == np.dtype(dtype), name
                if self.fmt == "zarr":
                    assert tuple(arr.chunks) == chunks, name
                assert (np.asarray(arr[...]) == fill).all(), name
            assert s.children("bases") == []
            assert sorted(s.children("")) == sorted(REQUIRED + ("bases",))

    def test_manifest_round_trip(self, where):
        m = _manifest(tokens=self.tokens)
        m.extra = {"someone_elses": [1, 2]}
        create_store(where, m, self.fmt).close()
        with open_store(where) as s:
            got = Manifest.read(s)
            keys = list(s.manifest)
        assert sorted(keys) == sorted(FIELDS + ("someone_elses",))
        if self.fmt == "zarr":  # JSON keeps the order written (HDF5 lists attributes by name)
            assert keys == list(FIELDS) + ["someone_elses"]
        assert got == m and got.to_attrs() == m.to_attrs()
        assert got.raw == m.to_attrs()
        assert got.teacher_identity == {"spec": "synthetic"} and got.data_fingerprint is None
        assert not got.limited and got.n_chunks == -(-N // CH)

    def test_manifest_reads_unknown_and_missing_keys(self):
        m = Manifest.from_attrs({"key": "k", "identity": "not a dict", "future": 1})
        assert m.key == "k" and m.identity == {} and m.extra == {"future": 1} and m.n_rows is None

    # -- the chunk iterator ------------------------------------------------
    def test_chunks_cover_every_row_in_the_stores_own_chunks(self, where):
        self.cache(where)
        x = _features(tokens=self.tokens)
        with open_cache(where) as c:
            assert (c.n, c.views, c.dim, c.chunk_rows) == (N, V, D, CH)
            chunks = list(c.chunks(progress=False))
            assert [(ch.index, ch.start, ch.stop) for ch in chunks] == list(iter_chunks(N, CH))
            np.testing.assert_array_equal(np.concatenate([ch.x for ch in chunks]), x)
            assert all(ch.ok.all() for ch in chunks)
            np.testing.assert_array_equal(c.labels(), np.arange(N) % 3)
            np.testing.assert_array_equal(c.sample_index(), np.arange(N))
            assert c.view_params().shape == (N, V, 5) and c.row_ok().all()

    def test_chunks_subset_view_and_other_spans(self, where):
        self.cache(where)
        x = _features(tokens=self.tokens)
        with open_cache(where) as c:
            picked = list(c.chunks(chunk_ids=[1, 3], view=0, progress=False))
            assert [ch.index for ch in picked] == [1, 3]
            np.testing.assert_array_equal(picked[0].x, x[CH:2 * CH, 0])
            for rows in (1, 7, 64):  # chunk-size invariance
                got = np.concatenate([ch.x for ch in iter_feature_chunks(c.store, rows, progress=False)])
                np.testing.assert_array_equal(got, x)
            with pytest.raises(StoreError, match="chunk_rows must be >= 1"):
                read_chunk_rows(c.store, 0)

    # -- the integrity check -----------------------------------------------
    def test_complete_cache_passes_every_level(self, where):
        self.cache(where)
        with open_cache(where) as c:
            assert all(c.problem(level) is None for level in ("open", "done", "complete"))
        assert resolve_cache(where) == where

    def test_incomplete_cache_is_refused(self, where):
        done = np.ones(-(-N // CH), bool)
        done[2] = False
        self.cache(where, chunk_done=done)
        with pytest.raises(StoreError, match=r"train cache .* is incomplete \(3/4 chunks done\)"):
            open_cache(where, what="train")
        with open_cache(where, require="open") as c:
            assert "incomplete" in c.problem("done")

    def test_unfinished_manifest_is_refused(self, where):
        self.cache(where, complete=False)
        with pytest.raises(StoreError, match=r"incomplete \(4/4 chunks done\)"):
            open_cache(where)

    def test_wrong_shape_is_refused(self, where):
        self.cache(where)
        with open_store(where, "a") as s:
            s.create("labels", (N + 1,), "int64", (CH,), fill_value=-1)
        with pytest.raises(StoreError, match=r"is damaged: array 'labels' has shape \(51,\), manifest implies \(50,\)"):
            open_cache(where)

    def test_edited_manifest_is_refused(self, where):
        self.cache(where)
        with open_store(where, "a") as s:
            s.set_attrs({"teacher_spec": "someone-else"})
        with pytest.raises(StoreError, match="contradicts its identity"):
            open_cache(where)

    def test_missing_array_is_refused(self, where):
        self.cache(where)
        with open_store(where, "a") as s:
            s.delete("chunk_done")
        with pytest.raises(StoreError, match="has no chunk_done array: its creation was cut short"):
            open_cache(where)

    def test_missing_chunk_is_refused(self, where):
        self.cache(where)
        self.drop_chunk(where, "features", 1)
        with open_store(where) as s:
            assert s.missing_chunks("features") == [1]
        with pytest.raises(StoreError, match="chunk 1: the data of 'features' are missing"):
            open_cache(where)
        with open_cache(where, require="done") as c:  # the cheap level does not look at chunks
            assert c.problem("done") is None

    # -- bases and groups --------------------------------------------------
    def test_basis_write_and_read(self, where):
        rng = np.random.default_rng(1)
        comps = np.linalg.qr(rng.normal(size=(D, 3)))[0].T
        arrays = {"mean": rng.normal(size=D), "components": comps, "eigenvalues": np.array([3.0, 2.0, 1.0]),
                  "explained_ratio": np.array([0.5, 0.8, 0.9])}

        def coords(s, group):
            s.create(f"{group}/coords", (N, V, 3), "float16", (CH, V, 3), fill_value=0)[...] = 1

        self.cache(where, bases=lambda s: write_basis(s, "pca", arrays, {"kind": "pca", "whiten": False}, coords))
        with open_cache(where) as c:
            assert c.bases() == ["pca"]
            b = c.basis("pca")
            assert b.k == 3 and b.dim == D and b.kind == "pca" and b.attrs["complete"] is True
            for name, arr in arrays.items():
                np.testing.assert_array_equal(getattr(b, name), arr)
            assert (c.store.read("bases/pca/coords") == 1).all()
            with pytest.raises(StoreError, match="no complete basis 'other'"):
                c.basis("other")

    def test_half_written_basis_is_invisible_then_removed(self, where, monkeypatch):
        arrays = {"mean": np.zeros(D), "components": np.eye(D), "eigenvalues": np.ones(D),
                  "explained_ratio": np.arange(1, D + 1) / D}
        self.cache(where)

        def crash(*a, **k):
            raise RuntimeError("killed")

        monkeypatch.setattr(store_bases, "publish_group", crash)
        monkeypatch.setattr(store_bases, "discard_group", lambda s, tmp: None)
        with open_store(where, "a") as s, pytest.raises(RuntimeError, match="killed"):
            write_basis(s, "identity", arrays, {"kind": "identity"})
        monkeypatch.undo()
        with open_store(where, "a") as s:
            assert s.bases() == [] and [c for c in s.children("bases") if c.startswith(".tmp-identity-")]
            remove_leftovers(s)
            assert s.children("bases") == []
            write_basis(s, "identity", arrays, {"kind": "identity"})
            assert load_basis(s, "identity").k == D

    def test_groups_delete_and_rename(self, where):
        self.cache(where)
        with open_store(where, "a") as s:
            s.require_group("bases/.tmp-a")
            s.create("bases/.tmp-a/x", (4,), "float64", (4,), fill_value=0)[...] = np.arange(4.0)
            s.set_attrs({"complete": True}, "bases/.tmp-a")
            s.rename("bases/.tmp-a", "bases/a")
            assert s.children("bases") == ["a"] and s.attrs("bases/a") == {"complete": True}
            np.testing.assert_array_equal(s.read("bases/a/x"), np.arange(4.0))
            s.delete("bases/a")
            assert s.children("bases") == [] and "bases/a" not in s
        with pytest.raises(StoreError, match="is missing"):
            open_store(where)["bases/a"]

    def test_registry_lists_the_cache(self, where):
        self.cache(where)
        rows = list_caches(where.parent)
        assert [r["key"] for r in rows] == [where.name] and rows[0]["complete"] and rows[0]["rows"] == N


class TestZarrDirectory(StoreSuite):
    fmt = "zarr"

    def drop_chunk(self, where, name, chunk):
        shutil.rmtree(where / name / "c" / str(chunk))


class TestHDF5(StoreSuite):
    fmt = "hdf5"


class TestZarrDirectoryPatch(TestZarrDirectory):
    tokens = 4


class TestHDF5Patch(TestHDF5):
    tokens = 4


class TestMemoryURL(StoreSuite):
    fmt = "zarr"

    def location(self, tmp_path):
        return RemotePath(f"memory://tcskd-store-{uuid.uuid4().hex[:8]}/caches/cache")

    def drop_chunk(self, where, name, chunk):
        assert is_remote(where)
        target = where / name / "c" / str(chunk)
        target.fs.rm(target._path, recursive=True)


def test_unknown_level_is_a_programming_error(tmp_path):
    path = write_cache(tmp_path / "c", _features(), chunk_rows=CH)
    with open_store(path) as s, pytest.raises(ValueError, match="unknown integrity level"):
        first_problem(s, "rows")
