"""Caches addressed by fsspec URLs: memory:// (Zarr over fsspec) and file://."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from tcskd.cache.build import CacheConfig, build_cache
from tcskd.store.registry import list_caches, resolve_cache
from tcskd.store.backends import RemotePath, as_location, open_store
from tcskd.cache.verify import verify_cache
from tcskd.store.bases import load_basis
from tcskd.subspace.fit import BasisConfig, fit_basis

from conftest import run_cli


def _cfg(data, teacher, root, **kw):
    return CacheConfig(data=data, teacher=teacher, cache_root=root, image_size=16, chunk_rows=8, batch_size=4,
                       dtype="float32", **kw)


def test_memory_url_cache_basis_and_listing(tiny_npz, tiny_teacher, tmp_path):
    root = f"memory://tcskd-{uuid.uuid4().hex[:8]}/caches"
    res = build_cache(_cfg(tiny_npz, tiny_teacher, root))
    assert isinstance(res.path, RemotePath) and str(res.path).startswith("memory://")
    local = build_cache(_cfg(tiny_npz, tiny_teacher, tmp_path / "local"))
    with open_store(res.path) as r, open_store(local.path) as l:
        assert r.format == "zarr" and r.manifest["complete"]
        for name in ("features", "labels", "sample_index", "view_params", "row_ok"):
            assert r.read(name).tobytes() == l.read(name).tobytes(), name
    assert build_cache(_cfg(tiny_npz, tiny_teacher, root)).hit
    assert resolve_cache(res.path.name, root) == res.path
    assert [row["key"] for row in list_caches(root)] == [res.path.name]
    assert verify_cache(res.path).ok

    summary = fit_basis(BasisConfig(cache=str(res.path), name="pca", dim=4, coords=True, device="cpu"))
    assert summary["k"] == 4
    with open_store(res.path) as s:
        assert s.bases() == ["pca"]
        b = load_basis(s, "pca")
        np.testing.assert_allclose(s.read("bases/pca/coords")[:, 0], b.project(s.read("features")[:, 0]), atol=1e-2)
    assert (res.path / "basis-pca.png").is_file()


def test_hdf5_needs_a_local_path(tiny_npz, tiny_teacher):
    from tcskd.errors import StoreError

    with pytest.raises(StoreError, match="HDF5 stores are local files"):
        build_cache(_cfg(tiny_npz, tiny_teacher, f"memory://h5-{uuid.uuid4().hex[:6]}", format="hdf5"))


@pytest.mark.slow
def test_file_url_is_a_local_path(tiny_npz, tiny_teacher, tmp_path):
    assert as_location(f"file://{tmp_path}") == tmp_path
    r = run_cli(["cache", "--data", tiny_npz, "--teacher", tiny_teacher, "--image-size", "16",
                 "--cache-root", f"file://{tmp_path}/c"])
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip().splitlines()[-1]
    assert path.startswith(str(tmp_path / "c"))
    r = run_cli(["basis", "--cache", path.rsplit("/", 1)[1], "--cache-root", f"file://{tmp_path}/c", "--dim", "3"])
    assert r.returncode == 0, r.stderr
