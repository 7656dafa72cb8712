"""A full disk and a read-only cache root: a clear error, and nothing marked done that was not written.

Writes fail through patched writers (Zarr's file writer, h5py's dataset writes),
through a read-only view of the cache root (every Python, Zarr and h5py write
under it fails with EROFS), or, in a child process, through RLIMIT_FSIZE, which
makes every writer, C libraries included, fail as on a full disk.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from reliability import _faults
from reliability._students import SPEC
from reliability._tally import tally
from reliability.conftest import ARRAYS, CHUNK, assert_same_arrays, leftovers, one_error_line, read_arrays


def _cli(args):
    from tcskd.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _honest(path: Path, ref: Path) -> int:
    """Every chunk marked done holds the reference's data; returns how many are done."""
    from tcskd.store.backends import detect_format, open_store

    if detect_format(path) is None:
        return 0
    got, want = read_arrays(path), read_arrays(ref)
    with open_store(path) as s:
        assert not s.manifest.get("complete") or got["chunk_done"].all()
    for c in np.flatnonzero(got["chunk_done"]):
        sl = slice(c * CHUNK, (c + 1) * CHUNK)
        for name in ARRAYS[:-1]:
            assert got[name][sl].tobytes() == want[name][sl].tobytes(), (c, name)
    return int(got["chunk_done"].sum())


ZARR_FULL = {  # the disk is full from this file write on (patterns over the reference run's writes)
    "during store creation": (r"put:.*/features/zarr\.json", 0),
    "mid chunk 1": (r"put:.*/sample_index/c/1", 0),
    "chunk 3's flag": (r"put:.*/chunk_done/c/3", 0),
    "final manifest, first write": (r"put:.*/[0-9a-f]{16}/zarr\.json", 0),
    "final manifest, last write": (r"put:.*/[0-9a-f]{16}/zarr\.json", 1),
}


@pytest.mark.parametrize("when", list(ZARR_FULL))
def test_zarr_cache_on_a_full_disk(world, tmp_path, when):
    """The disk fills up at a chosen file write: a one-line error, only written chunks marked done."""
    ref, _, puts = world.ref("zarr")
    pattern, nth = ZARR_FULL[when]
    n = [i for i, label in puts if re.fullmatch(pattern, label)][nth]
    root = tmp_path / "caches"
    with _faults.zarr_disk_full(n - 1):
        r = _cli(world.cache_args("zarr", root))
    tally("faults", "disk full (zarr writer)")
    assert r.exit_code == 2, (r.output, r.exception)
    assert "No space left on device" in one_error_line(r.stderr)
    done = _honest(root / ref.name, ref)
    assert not [p for p in leftovers(root) if ".tmp-" in p], "a half-created store was left behind"
    again = _cli(world.cache_args("zarr", root))
    assert again.exit_code == 0, again.output
    assert_same_arrays(read_arrays(root / ref.name), read_arrays(ref))
    print(f"{when}: {done} chunk(s) kept")


@pytest.mark.parametrize("after", [0, 3, 13, 29])
def test_hdf5_cache_on_a_full_disk(world, tmp_path, after):
    ref = world.ref("hdf5")[0]
    root = tmp_path / "caches"
    with _faults.h5_disk_full(after):
        r = _cli(world.cache_args("hdf5", root))
    tally("faults", "disk full (h5py writer)")
    assert r.exit_code == 2, (r.output, r.exception)
    assert "No space left on device" in one_error_line(r.stderr)
    _honest(root / ref.name, ref)
    again = _cli(world.cache_args("hdf5", root))
    assert again.exit_code == 0, again.output
    assert_same_arrays(read_arrays(root / ref.name), read_arrays(ref))


def test_file_size_limit_in_every_writer(world, fs, tmp_path):
    """RLIMIT_FSIZE: HDF5's C library and torch's checkpoint writer fail like on a full disk."""
    from tcskd.store.registry import list_caches

    root = tmp_path / "caches"
    res = fs.run(world.cache_args("hdf5", root), tmp_path / "h5", [{"domain": "rlimit", "bytes": 4096}])
    tally("faults", "file size limit (HDF5 C library)")
    assert res.code == 2, res.stderr
    assert re.search(r"File too large|cannot create|Unable to", one_error_line(res.stderr)), res.stderr
    assert list_caches(root) == [] and not leftovers(root)

    from tcskd.subspace.fit import BasisConfig, fit_basis

    cache = world.copy_ref("zarr", tmp_path / "train")
    fit_basis(BasisConfig(cache=str(cache), name="pca", dim=8, device="cpu"))
    out = tmp_path / "run"
    args = ["-q", "train", "--cache", cache, "--student", SPEC, "--epochs", "2", "--batch-size", "8", "--device", "cpu",
            "--out", out]
    res = fs.run(args, tmp_path / "t", [{"domain": "rlimit", "bytes": 6000}])
    tally("faults", "file size limit (torch checkpoint writer)")
    assert res.code == 2, res.stderr
    assert re.search(r"checkpoint", one_error_line(res.stderr)), res.stderr
    assert not (out / "checkpoint.pt").exists() and not (out / "final.json").exists()
    assert not [p for p in os.listdir(out) if "tmp" in p], os.listdir(out)


def test_basis_on_a_full_disk(world, tmp_path):
    from tcskd.store.backends import open_store

    cache = world.copy_ref("zarr", tmp_path / "caches")
    for after in (1, 12):
        with _faults.zarr_disk_full(after):
            r = _cli(["basis", "--cache", cache, "--name", "pca", "--dim", "8", "--coords", "--device", "cpu"])
        tally("faults", "disk full (basis writer)")
        assert r.exit_code == 2, (r.output, r.exception)
        assert "No space left on device" in one_error_line(r.stderr)
        with open_store(cache) as s:
            assert s.bases() == [] and s.children("bases") == []
    assert _cli(["basis", "--cache", cache, "--name", "pca", "--dim", "8", "--device", "cpu"]).exit_code == 0


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_read_only_cache_root(world, tmp_path, fmt):
    from tcskd.store.backends import open_store

    # a new cache on a read-only root: a clear error, nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    with _faults.read_only(empty):
        r = _cli(world.cache_args(fmt, empty))
    tally("faults", "read-only cache root")
    assert r.exit_code == 2 and "Read-only file system" in one_error_line(r.stderr), r.output
    assert _snapshot(empty) == {}

    # a complete cache on a read-only root: every reader works, the same command is a hit
    full = tmp_path / "full"
    cache = world.copy_ref(fmt, full)
    with open_store(cache, "a") as s:
        pass
    before = _snapshot(full)
    with _faults.read_only(full):
        r = _cli(world.cache_args(fmt, full))
        assert r.exit_code == 0 and r.stdout.strip().splitlines()[-1] == str(cache), r.output
        for args in (["cache", "ls", "--cache-root", full], ["cache", "info", cache], ["cache", "verify", cache]):
            assert _cli(args).exit_code == 0, args
        from tcskd.train.loop import TrainConfig, load_run_inputs, resolve_config

        prep = load_run_inputs(resolve_config(TrainConfig(cache=str(cache), method="fitnet", device="cpu")))
        assert len(prep.train_set) + len(prep.val_set) == 48  # training + validation rows
        r = _cli(["basis", "--cache", cache, "--device", "cpu"])
        assert r.exit_code == 2 and "Read-only file system" in one_error_line(r.stderr), r.output
    tally("faults", "read-only cache root")
    assert _snapshot(full) == before

    # a partial cache on a read-only root: refused, left as it was
    with open_store(cache, "a") as s:
        s["chunk_done"][3] = False
        s.set_attrs({"complete": False})
    before = _snapshot(full)
    with _faults.read_only(full):
        r = _cli(world.cache_args(fmt, full))
    tally("faults", "read-only cache root")
    assert r.exit_code == 2 and "Read-only file system" in one_error_line(r.stderr), r.output
    assert _snapshot(full) == before
