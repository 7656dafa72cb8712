"""Damaged caches: `tcskd cache verify` names the problem, `tcskd train` refuses to start.

Each case copies a complete cache (with bases), damages it one way (flipped
bytes in a chunk file, deleted chunks or arrays, a truncated HDF5 file, an
edited manifest) and checks both commands: verify exits 1 naming the problem;
train exits non-zero with one line naming it, before creating its run folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from reliability._students import SPEC
from reliability._tally import tally
from reliability.conftest import one_error_line


@pytest.fixture(scope="module")
def templates(world, tmp_path_factory):
    from tcskd.subspace.fit import BasisConfig, fit_basis

    out = {}
    for fmt in ("zarr", "hdf5"):
        cache = world.copy_ref(fmt, tmp_path_factory.mktemp(f"tmpl-{fmt}"))
        fit_basis(BasisConfig(cache=str(cache), name="pca", dim=8, device="cpu"))
        if fmt == "zarr":
            fit_basis(BasisConfig(cache=str(cache), name="pcac", dim=8, coords=True, device="cpu"))
        out[fmt] = cache
    return out


def flip(rel: str, offset: float = 0.5):
    def mutate(p: Path) -> None:
        f = p / rel
        raw = bytearray(f.read_bytes())
        raw[int(len(raw) * offset)] ^= 0xFF
        f.write_bytes(bytes(raw))
    return mutate


def delete(rel: str):
    def mutate(p: Path) -> None:
        f = p / rel
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    return mutate


def zarr_manifest(change):
    def mutate(p: Path) -> None:
        meta = json.loads((p / "zarr.json").read_text())
        change(meta["attributes"])
        (p / "zarr.json").write_text(json.dumps(meta))
    return mutate


def h5(change):
    def mutate(p: Path) -> None:
        import h5py

        with h5py.File(p / "store.h5", "r+") as f:
            change(f)
    return mutate


def truncate(by: float):
    def mutate(p: Path) -> None:
        f = p / "store.h5"
        size = f.stat().st_size
        with open(f, "r+b") as fh:
            fh.truncate(int(size * by) if by < 1 else size - int(by))
    return mutate


def _set(key, value):
    return lambda a: a.__setitem__(key, value)


def _edit_identity(a):
    a["identity"]["teacher"]["image_size"] = 99


def _h5_identity(f):
    ident = json.loads(f.attrs["identity"])
    ident["teacher"]["mean"] = [0.5, 0.5, 0.5]
    f.attrs["identity"] = json.dumps(ident)


# (id, format, damage, what verify says, what train says, basis to train on)
CASES = [
    ("flip features chunk", "zarr", flip("features/c/2/0/0"), r"chunk 2 .*unreadable", r"'features' rows 16\.\.23", "pca"),
    ("flip labels chunk", "zarr", flip("labels/c/3"), r"chunk 3 .*unreadable", r"'labels' rows 24\.\.31", "pca"),
    ("flip sample_index chunk", "zarr", flip("sample_index/c/0"), r"chunk 0 .*unreadable", r"'sample_index' rows 0\.\.7", "pca"),
    ("flip row_ok chunk", "zarr", flip("row_ok/c/5"), r"chunk 5 .*unreadable", r"'row_ok' rows 40\.\.47", "pca"),
    ("flip view_params chunk", "zarr", flip("view_params/c/1/0/0"), r"chunk 1 .*unreadable", r"'view_params' rows 8\.\.15", "pca"),
    ("flip a chunk's first byte", "zarr", flip("features/c/4/0/0", 0.0), r"chunk 4 .*unreadable", r"'features' rows 32\.\.39", "pca"),
    ("flip basis coords chunk", "zarr", flip("bases/pcac/coords/c/1/0/0"), r"basis 'pcac' .*coords", r"coords' rows 8\.\.15", "pcac"),
    ("flip basis components", "zarr", flip("bases/pca/components/c/0/0"), r"basis 'pca' is unreadable", r"components", "pca"),
    ("flip basis mean", "zarr", flip("bases/pca/mean/c/0"), r"basis 'pca' is unreadable", r"mean", "pca"),
    ("delete features chunk", "zarr", delete("features/c/2/0/0"), r"chunk 2: the data of 'features' are missing", r"'features' are missing", "pca"),
    ("delete labels chunk", "zarr", delete("labels/c/0"), r"chunk 0: the data of 'labels' are missing", r"'labels' are missing", "pca"),
    ("delete view_params chunk", "zarr", delete("view_params/c/5/0/0"), r"'view_params' are missing", r"'view_params' are missing", "pca"),
    ("delete coords chunk", "zarr", delete("bases/pcac/coords/c/3/0/0"), r"coords chunk 3 is missing", r"coords.*missing", "pcac"),
    ("delete chunk_done flag", "zarr", delete("chunk_done/c/4"), r"incomplete: 1 of 6", r"incomplete \(5/6", "pca"),
    ("delete features array", "zarr", delete("features"), r"array 'features' is missing", r"'features' is missing", "pca"),
    ("garbage array metadata", "zarr", lambda p: (p / "labels" / "zarr.json").write_text("{oops"), r"'labels'",
     r"'labels'", "pca"),
    ("edit manifest identity", "zarr", zarr_manifest(_edit_identity), r"does not hash to its key", r"does not hash", "pca"),
    ("edit manifest n_rows", "zarr", zarr_manifest(_set("n_rows", 40)), r"manifest implies \(40", r"manifest implies", "pca"),
    ("edit manifest chunk_rows", "zarr", zarr_manifest(_set("chunk_rows", 16)), r"chunk_done.*manifest implies \(3,\)", r"manifest implies", "pca"),
    ("edit manifest teacher_spec", "zarr", zarr_manifest(_set("teacher_spec", "torchscript:/elsewhere.pt")),
     r"teacher_spec=.*contradicts", r"contradicts its identity", "pca"),
    ("edit manifest complete", "zarr", zarr_manifest(_set("complete", False)), r"does not mark the cache complete", r"incomplete", "pca"),
    ("edit manifest schema_version", "zarr", zarr_manifest(_set("schema_version", "one")), r"malformed manifest", r"malformed manifest", "pca"),
    ("remove manifest schema_version", "zarr", zarr_manifest(lambda a: a.pop("schema_version")), r"no tcskd manifest", r"no tcskd manifest", "pca"),
    ("garbage manifest file", "zarr", lambda p: (p / "zarr.json").write_text('{"zarr_format": 3, "node'), r"cannot open Zarr store",
     r"cannot open Zarr store", "pca"),
    ("empty manifest file", "zarr", lambda p: (p / "zarr.json").write_bytes(b""), r"cannot open Zarr store", r"cannot open Zarr store", "pca"),
    ("truncate HDF5 file by half", "hdf5", truncate(0.5), r"cannot open HDF5 store", r"cannot open HDF5 store", "pca"),
    ("truncate HDF5 file by 1 byte", "hdf5", truncate(1), r"cannot open HDF5 store", r"cannot open HDF5 store", "pca"),
    ("flip HDF5 superblock", "hdf5", flip("store.h5", 0.0), r"cannot open HDF5 store", r"cannot open HDF5 store", "pca"),
    ("delete HDF5 features", "hdf5", h5(lambda f: f.__delitem__("features")), r"array 'features' is missing", r"'features' is missing", "pca"),
    ("edit HDF5 manifest identity", "hdf5", h5(_h5_identity), r"does not hash to its key", r"does not hash", "pca"),
    ("garbage HDF5 manifest attribute", "hdf5", h5(lambda f: f.attrs.__setitem__("schema_version", np.void(b"\xff\x80\x00"))),
     r"malformed manifest", r"malformed manifest", "pca"),
    ("HDF5 chunk_done cleared", "hdf5", h5(lambda f: f["chunk_done"].__setitem__(2, False)), r"incomplete", r"incomplete", "pca"),
]


@pytest.mark.parametrize("name, fmt, damage, says, refuses, basis", CASES, ids=[c[0] for c in CASES])
def test_damage_is_named_and_refused(templates, tmp_path, name, fmt, damage, says, refuses, basis):
    from tcskd.cli import main

    cache = tmp_path / templates[fmt].name
    shutil.copytree(templates[fmt], cache)
    damage(cache)
    r = CliRunner().invoke(main, ["cache", "verify", str(cache)])
    assert r.exit_code == 1, (r.output, r.exception)
    assert np.any([__import__("re").search(says, l) for l in r.output.splitlines()]), r.output
    one_error_line(r.stderr)
    run = tmp_path / "run"
    t = CliRunner().invoke(main, ["train", "--cache", str(cache), "--basis", basis, "--student", SPEC, "--epochs", "1",
                                  "--batch-size", "8", "--out", str(run), "--device", "cpu"])
    assert t.exit_code == 2, (t.output, t.exception)
    line = one_error_line(t.stderr)
    assert __import__("re").search(refuses, line), line
    assert not run.exists(), "train started on a damaged cache"
    tally("corruptions", f"{fmt}: {'manifest edit' if 'manifest' in name else 'data damage'}")


# A --dim K cache (tcskd cache --tokens patch --dim 3): its coordinates' chunks and its token basis, damaged.
DENSE_CASES = [
    ("flip coordinates chunk", flip("features/c/2/0/0/0"), r"chunk 2 .*unreadable", r"'features' rows 16\.\.23"),
    ("delete coordinates chunk", delete("features/c/1/0/0/0"), r"chunk 1: the data of 'features' are missing",
     r"'features' are missing"),
    ("flip token basis components", flip("bases/pca/components/c/0/0"), r"basis 'pca' is unreadable",
     r"'bases/pca/components' rows 0\.\.2 cannot be read"),
    ("delete the token basis", delete("bases/pca"), r"basis 'pca' whose coordinates the features hold is missing",
     r"basis 'pca' whose coordinates the features hold is missing"),
]


@pytest.fixture(scope="module")
def dense_template(world, tmp_path_factory):
    from tcskd.cache.build import build_cache

    return build_cache(world.cache_config("zarr", tmp_path_factory.mktemp("tmpl-dense"), "coords")).path


@pytest.mark.parametrize("name, damage, says, reads", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_dense_damage_is_named_and_refused(dense_template, tmp_path, name, damage, says, reads):
    import re

    from tcskd.cli import main
    from tcskd.errors import StoreError
    from tcskd.store.handle import open_cache

    cache = tmp_path / dense_template.name
    shutil.copytree(dense_template, cache)
    damage(cache)
    r = CliRunner().invoke(main, ["cache", "verify", str(cache)])
    assert r.exit_code == 1, (r.output, r.exception)
    assert any(re.search(says, line) for line in r.output.splitlines()), r.output
    one_error_line(r.stderr)
    with pytest.raises(StoreError) as e:  # a reader of the coordinates (and their basis) refuses, naming it
        with open_cache(cache) as c:
            c.features(None)
            c.basis(c.manifest.coords_of)
    assert re.search(reads, str(e.value)), str(e.value)
    tally("corruptions", "zarr: dense data damage")
