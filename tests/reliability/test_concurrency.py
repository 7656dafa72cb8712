"""Two writers of one cache, and readers while a writer is active.

A writer child is paused (not raced) at a chosen write; while it holds the
cache, a second writer is refused (or waits with --wait), and readers see
either the old complete state or an incomplete cache reported as such.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from reliability._students import SPEC
from reliability._tally import tally
from reliability.conftest import assert_same_arrays, one_error_line, read_arrays


def _cli(args):
    from tcskd.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_second_writer_and_readers_during_a_write(world, fs, tmp_path, fmt):
    from tcskd.errors import StoreError
    from tcskd.train.loop import TrainConfig, load_run_inputs, resolve_config

    ref, events, _ = world.ref(fmt)
    root = tmp_path / "caches"
    args = world.cache_args(fmt, root)
    between = next(n for n, label in events if label == "setitem:features:24:32")  # chunks 0-2 done
    a_out = tmp_path / "a"
    a = fs.spawn(args, a_out, [{"domain": "store", "n": between, "action": "pause"}])
    _wait_for(a_out / "paused")
    tally("faults", "writer paused mid-run")
    path = root / ref.name

    # a second writer of the same key is refused at once, naming the holder
    b = fs.run(args, tmp_path / "b")
    assert b.code == 3, b.stderr
    assert re.search(rf"another process \(pid {a}\) is writing cache", one_error_line(b.stderr))
    tally("faults", "concurrent writer of the same cache")

    # readers: an incomplete cache, reported as such
    rows = [json.loads(l) for l in _cli(["cache", "ls", "--cache-root", root, "--json"]).output.splitlines()]
    assert len(rows) == 1 and rows[0]["complete"] is False and rows[0]["writing"] is True
    assert rows[0]["chunks_done"] == "3/6"
    assert "writing 3/6" in _cli(["cache", "ls", "--cache-root", root]).output
    r = _cli(["cache", "verify", path])
    assert r.exit_code == 1 and "incomplete: 3 of 6 chunks not done" in r.output
    with pytest.raises(StoreError, match=r"incomplete \(3/6 chunks done\)"):
        load_run_inputs(resolve_config(TrainConfig(cache=str(path), method="fitnet", device="cpu")))
    r = _cli(["basis", "--cache", path, "--device", "cpu"])
    assert r.exit_code == 3 and "is writing cache" in one_error_line(r.stderr)

    # a waiting writer takes over when the first one dies, and finishes the same cache
    c_out = tmp_path / "c"
    c = fs.spawn([*args, "--wait"], c_out)
    time.sleep(0.3)
    assert fs.running(c), "the --wait writer did not wait"
    os.kill(a, signal.SIGKILL)
    assert fs.wait(a, a_out).killed
    tally("faults", "SIGKILL of a writer while another waits")
    done = fs.wait(c, c_out)
    assert done.code == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == str(path)
    assert_same_arrays(read_arrays(path), read_arrays(ref))
    rows = [json.loads(l) for l in _cli(["cache", "ls", "--cache-root", root, "--json"]).output.splitlines()]
    assert rows[0]["complete"] is True and rows[0]["writing"] is False


def test_readers_while_a_store_is_being_created(world, fs, tmp_path):
    """Before the new store is renamed into place, readers see no cache at all."""
    ref, events, _ = world.ref("zarr")
    root = tmp_path / "caches"
    n = next(n for n, label in events if label.startswith("os.rename:"))
    out = tmp_path / "a"
    pid = fs.spawn(world.cache_args("zarr", root), out, [{"domain": "store", "n": n, "action": "pause"}])
    _wait_for(out / "paused")
    tally("faults", "writer paused mid-run")
    assert _cli(["cache", "ls", "--cache-root", root, "--json"]).output.strip() == ""
    r = _cli(["train", "--cache", ref.name, "--cache-root", root, "--out", tmp_path / "run", "--device", "cpu"])
    assert r.exit_code == 2 and f"no cache '{ref.name}'" in one_error_line(r.stderr)
    (out / "release").write_text("")
    assert fs.wait(pid, out).code == 0
    assert_same_arrays(read_arrays(root / ref.name), read_arrays(ref))


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_readers_while_a_basis_is_being_replaced(world, fs, tmp_path, fmt):
    """Refitting `pca` on a complete cache: until it is published, readers use the old basis."""
    from tcskd.store.backends import open_store
    from tcskd.store.bases import load_basis
    from tcskd.subspace.fit import BasisConfig, fit_basis
    from tcskd.train.loop import TrainConfig, load_run_inputs, resolve_config

    cache = world.copy_ref(fmt, tmp_path / "caches")
    fit_basis(BasisConfig(cache=str(cache), name="pca", dim=4, device="cpu"))
    with open_store(cache) as s:
        old = load_basis(s, "pca")
    probe = world.copy_ref(fmt, tmp_path / "probe")
    rec = fs.run(["-q", "basis", "--cache", probe, "--name", "pca", "--dim", "8", "--device", "cpu"], tmp_path / "rec",
                 [{"domain": "store", "action": "record"}])
    n = next(n for n, label in rec.events() if label.startswith("rename:bases/.tmp-pca"))
    out = tmp_path / "w"
    pid = fs.spawn(["-q", "basis", "--cache", cache, "--name", "pca", "--dim", "8", "--device", "cpu"], out,
                   [{"domain": "store", "n": n, "action": "pause"}])
    _wait_for(out / "paused")
    tally("faults", "writer paused mid-run")
    rows = [json.loads(l) for l in _cli(["cache", "ls", "--cache-root", cache.parent, "--json"]).output.splitlines()]
    assert rows[0]["bases"] == ["pca"] and rows[0]["complete"] is True
    with open_store(cache) as s:
        seen = load_basis(s, "pca")
    assert seen.k == 4 and (seen.components == old.components).all()
    prep = load_run_inputs(resolve_config(TrainConfig(cache=str(cache), basis="pca", device="cpu")))
    assert prep.k == 4
    (out / "release").write_text("")
    assert fs.wait(pid, out).code == 0
    with open_store(cache) as s:
        assert load_basis(s, "pca").k == 8
