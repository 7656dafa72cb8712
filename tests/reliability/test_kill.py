"""SIGKILL at seeded points of `tcskd cache`, `tcskd basis` and `tcskd train`; rerun; nothing lost.

Kill points are events, not wall-clock races: the child process counts its own
writes (tests/reliability/_faults.py) and kills itself with SIGKILL before the
N-th one. The reference run records the same event sequence, so each point is
named (e.g. ``setitem:labels:0:8`` = chunk 0's features are written, its labels
are not). After each kill the interrupted state must be honest (no chunk marked
done whose data differ from the reference; nothing visible as complete that is
not), and rerunning the same command must give the reference, byte for byte.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from reliability._tally import tally
from reliability.conftest import (ARRAYS, BASIS_ARRAYS, CHUNK, assert_same_arrays, leftovers, read_arrays)
from tcskd.results import TIMING_KEYS

SEED = 20250101


def _first(events, pattern: str) -> int:
    for n, label in events:
        if re.fullmatch(pattern, label):
            return n
    raise AssertionError(f"no event matches {pattern}: {[l for _, l in events][:80]}")


def _last(events, pattern: str) -> int:
    hits = [n for n, label in events if re.fullmatch(pattern, label)]
    assert hits, pattern
    return hits[-1]


def cache_kill_points(fmt: str, events, puts, kind: str = "global") -> list[tuple[str, dict]]:
    """Named kill points: the required ones plus seeded random ones (a --dim cache: also in its token basis)."""
    named = {} if kind == "global" else {
        "token basis: arrays being written": _first(events, r"setitem:bases/\.tmp-pca-\d+/components:.*"),
        "token basis renamed into place, not marked complete": _first(events, r"set_attrs:bases/pca:complete"),
        "token basis complete, no chunk written yet": _first(events, r"setitem:features:0:8"),
    }
    named.update({
        "during store creation": _first(events, r"create:features"),
        "store created, not yet renamed into place": _first(events, r"os\.rename:[0-9a-f]{16}"),
        "chunk 0: features written, labels not": _first(events, r"setitem:labels:0:8"),
        "chunk 0: data written, chunk_done not": _first(events, r"setitem:chunk_done:0"),
        "between chunks 1 and 2": _first(events, r"setitem:features:16:24"),
        "last chunk: data written, chunk_done not": _last(events, r"setitem:chunk_done:\d+"),
        "final manifest update, before it": _first(events, r"set_attrs::skipped"),
        "final manifest update, skipped list written, complete flag not": _first(events, r"set_attrs::complete"),
    })
    points = [(name, {"domain": "store", "n": n}) for name, n in named.items()]
    rng = np.random.default_rng(SEED + len(fmt))
    others = sorted(set(n for n, _ in events) - set(named.values()))
    for n in sorted(rng.choice(others, size=3 if fmt == "zarr" else 2, replace=False)):
        label = dict(events)[int(n)]
        points.append((f"random: before {label}", {"domain": "store", "n": int(n)}))
    if fmt == "zarr":  # a crash in the middle of a file write leaves its temporary file
        last_flag = _last(puts, r"put:.*/chunk_done/c/\d+")
        root_meta = _first([e for e in puts if e[0] > last_flag], r"put:.*/[0-9a-f]{16}/zarr\.json")
        chunk1 = _first(puts, r"put:.*/features/c/1(/0)+")
        points.append(("torn write of the final manifest file", {"domain": "put", "n": root_meta, "torn": True}))
        points.append(("torn write of chunk 1's features", {"domain": "put", "n": chunk1, "torn": True}))
    return points


def check_honest(path: Path, ref: Path) -> dict:
    """An interrupted store never claims more than it holds; returns what it claims."""
    from tcskd.store.registry import list_caches
    from tcskd.store.backends import detect_format, open_store
    from tcskd.cache.verify import verify_cache

    rows = {r["key"]: r for r in list_caches(path.parent)}
    if detect_format(path) is None:  # killed before the store was published: nothing visible
        assert path.name not in rows
        return {"visible": False}
    want = read_arrays(ref)
    got = read_arrays(path)
    with open_store(path) as s:
        complete = bool(s.manifest.get("complete"))
    done = got["chunk_done"]
    for c in np.flatnonzero(done):
        sl = slice(c * CHUNK, (c + 1) * CHUNK)
        for name in ARRAYS[:-1]:
            assert got[name][sl].tobytes() == want[name][sl].tobytes(), f"chunk {c} marked done, {name} differs"
    if complete:
        assert done.all()
    assert rows[path.name]["complete"] == (complete and bool(done.all()))  # as readers and verify decide
    rep = verify_cache(path)
    assert rep.ok == (complete and done.all()), rep.problems
    return {"visible": True, "done": int(done.sum()), "complete": complete}


@pytest.mark.parametrize("fmt, kind", [("zarr", "global"), ("hdf5", "global"), ("zarr", "coords")])
def test_cache_killed_anywhere_resumes_to_the_reference(world, fs, tmp_path, fmt, kind):
    from tcskd.cache.build import build_cache
    from tcskd.store.backends import open_store
    from tcskd.cache.verify import verify_cache

    ref, events, puts = world.ref(fmt, kind)
    ref_arrays = read_arrays(ref)
    basis_arrays = BASIS_ARRAYS[:-1] if kind == "coords" else ()
    ref_basis = read_arrays(ref, basis_arrays, "bases/pca/")
    with open_store(ref) as s:
        ref_manifest = s.manifest
    points = cache_kill_points(fmt, events, puts, kind)
    assert len(points) >= (13 if fmt == "zarr" else 10) + (3 if kind == "coords" else 0)
    for i, (name, fault) in enumerate(points):
        root = tmp_path / f"p{i}" / "caches"
        res = fs.run(world.cache_args(fmt, root, kind=kind), tmp_path / f"p{i}" / "log",
                     [dict(fault, action="kill")])
        assert res.killed, (name, res.code, res.stderr)
        tally("faults", f"SIGKILL in tcskd cache ({fmt})")
        path = root / ref.name
        state = check_honest(path, ref)
        # rerun to completion
        again = build_cache(world.cache_config(fmt, root, kind))
        assert not again.hit and again.path == path, name
        assert_same_arrays(read_arrays(path), ref_arrays)
        assert_same_arrays(read_arrays(path, basis_arrays, "bases/pca/"), ref_basis)  # the coordinates' basis
        with open_store(path) as s:
            m = s.manifest
        assert {k: v for k, v in m.items() if k != "created"} == \
            {k: v for k, v in ref_manifest.items() if k != "created"}, name
        assert verify_cache(path).ok, name
        assert not leftovers(root), (name, leftovers(root))
        print(f"{fmt}: killed {name} ({fault}) -> {state}; resumed to the reference")


def test_cache_killed_three_times_in_a_row(world, fs, tmp_path):
    from tcskd.cache.build import build_cache

    ref, _, _ = world.ref("zarr")
    rng = np.random.default_rng(SEED)
    root = tmp_path / "caches"
    for i in range(3):
        n = int(rng.integers(2, 20))
        res = fs.run(world.cache_args("zarr", root), tmp_path / f"k{i}", [{"domain": "store", "n": n, "action": "kill"}])
        assert res.killed, res.stderr
        tally("faults", "SIGKILL in tcskd cache (zarr)")
        check_honest(root / ref.name, ref)
    build_cache(world.cache_config("zarr", root))
    assert_same_arrays(read_arrays(root / ref.name), read_arrays(ref))


# -- tcskd basis ----------------------------------------------------------------

def _basis_args(path: Path, dim: int = 8) -> list[str]:
    return ["-q", "basis", "--cache", str(path), "--name", "pca", "--dim", str(dim), "--coords", "--device", "cpu"]


def _basis_state(path: Path):
    """(visible bases, the pca basis arrays or None) as a reader sees them."""
    from tcskd.store.backends import open_store
    from tcskd.errors import StoreError
    from tcskd.store.bases import load_basis

    with open_store(path) as s:
        names = s.bases()
        try:
            b = load_basis(s, "pca")
        except StoreError:
            assert "pca" not in names
            return names, None
        arrays = {n: s.read(f"bases/pca/{n}") for n in BASIS_ARRAYS if f"bases/pca/{n}" in s}
        assert set(BASIS_ARRAYS[:4]) <= set(arrays), "a visible basis lacks arrays"
        return names, (b, arrays)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_basis_killed_anywhere_is_never_visible_half_written(world, fs, tmp_path, fmt):
    from tcskd.subspace.fit import BasisConfig, fit_basis
    from tcskd.train.loop import TrainConfig, load_run_inputs, resolve_config
    from tcskd.errors import StoreError

    ref_cache = world.copy_ref(fmt, tmp_path / "ref")
    rec = fs.run(_basis_args(ref_cache), tmp_path / "ref-log",
                 [{"domain": "store", "action": "record"}] + ([{"domain": "put", "action": "record"}]
                                                              if fmt == "zarr" else []))
    assert rec.code == 0, rec.stderr
    events, puts = rec.events("store"), rec.events("put")
    _, (_, ref_arrays) = _basis_state(ref_cache)
    named = {
        "first write": 1,
        "coords being written": _first(events, r"setitem:bases/\.tmp-pca-\d+/coords:8:16"),
        "arrays written, attributes not": _first(events, r"set_attrs:bases/\.tmp-pca-\d+:.*"),
        "before the rename into place": _first(events, r"rename:bases/\.tmp-pca-\d+"),
        "renamed, not yet marked complete": _first(events, r"set_attrs:bases/pca:complete"),
    }
    points = [(k, {"domain": "store", "n": n}) for k, n in named.items()]
    rng = np.random.default_rng(SEED + 7 + len(fmt))
    others = sorted(set(n for n, _ in events) - set(named.values()))
    points += [(f"random: before {dict(events)[int(n)]}", {"domain": "store", "n": int(n)})
               for n in sorted(rng.choice(others, size=2, replace=False))]
    if fmt == "zarr":
        meta = _first(puts, r"put:.*/bases/pca/zarr\.json")
        points.append(("torn write of the published basis's metadata", {"domain": "put", "n": meta, "torn": True}))
    for i, (name, fault) in enumerate(points):
        cache = world.copy_ref(fmt, tmp_path / f"p{i}")
        res = fs.run(_basis_args(cache), tmp_path / f"p{i}-log", [dict(fault, action="kill")])
        assert res.killed, (name, res.stderr)
        tally("faults", f"SIGKILL in tcskd basis ({fmt})")
        names, got = _basis_state(cache)
        assert got is None, f"{name}: a basis is visible after the kill"
        assert not [n for n in names if n.startswith(".")]
        with pytest.raises(StoreError, match="no complete basis 'pca'"):
            load_run_inputs(resolve_config(TrainConfig(cache=str(cache), basis="pca", device="cpu")))
        fit_basis(BasisConfig(cache=str(cache), name="pca", dim=8, coords=True, device="cpu"))
        _, (_, arrays) = _basis_state(cache)
        assert_same_arrays(arrays, ref_arrays)
        assert not leftovers(cache), leftovers(cache)
        if fmt == "zarr":
            with __import__("tcskd.store.backends", fromlist=["open_store"]).open_store(cache) as s:
                assert not [c for c in s.children("bases") if c.startswith(".")]


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_basis_replaced_and_killed_shows_old_or_nothing(world, fs, tmp_path, fmt):
    """Refitting `pca` with another K and killing it: readers see the old basis, or none, never a mix."""
    from tcskd.subspace.fit import BasisConfig, fit_basis

    template = world.copy_ref(fmt, tmp_path / "template")
    fit_basis(BasisConfig(cache=str(template), name="pca", dim=4, device="cpu"))
    rec_cache = world.copy_ref(fmt, tmp_path / "rec")
    shutil.rmtree(rec_cache)
    shutil.copytree(template, rec_cache)
    rec = fs.run(_basis_args(rec_cache), tmp_path / "rec-log", [{"domain": "store", "action": "record"}])
    assert rec.code == 0, rec.stderr
    ev = rec.events("store")
    for i, n in enumerate([_first(ev, r"rename:bases/\.tmp-pca-\d+"), _first(ev, r"set_attrs:bases/pca:complete")]):
        cache = tmp_path / f"r{i}" / template.name
        shutil.copytree(template, cache)
        res = fs.run(_basis_args(cache), tmp_path / f"r{i}-log", [{"domain": "store", "n": n, "action": "kill"}])
        assert res.killed, res.stderr
        tally("faults", f"SIGKILL in tcskd basis ({fmt})")
        _, got = _basis_state(cache)
        assert got is None or got[0].k == 4, "a half-replaced basis is visible"
        fit_basis(BasisConfig(cache=str(cache), name="pca", dim=8, coords=True, device="cpu"))
        assert _basis_state(cache)[1][0].k == 8


# -- tcskd train --resume ---------------------------------------------------------

TIMING = TIMING_KEYS | {"run_dir"}


@pytest.fixture(scope="module")
def train_cache(world, tmp_path_factory):
    from tcskd.subspace.fit import BasisConfig, fit_basis

    cache = world.copy_ref("zarr", tmp_path_factory.mktemp("train-cache"))
    fit_basis(BasisConfig(cache=str(cache), name="pca", dim=8, device="cpu"))
    return cache


def train_args(cache: Path, out: Path, *extra: str) -> list[str]:
    from reliability._students import SPEC

    return ["-q", "train", "--cache", str(cache), "--basis", "pca", "--student", SPEC, "--epochs", "3",
            "--batch-size", "8", "--device", "cpu", "--workers", "0", "--select-every", "1", "--drop-frac", "0.25",
            "--min-dim", "4", "--elsh-bits", "8", "--labels-per-class", "6", "--seed", "3", "--out", str(out), *extra]


def _outcome(run: Path) -> dict:
    import torch

    final = {k: v for k, v in json.loads((run / "final.json").read_text()).items() if k not in TIMING}
    rows = [{k: v for k, v in json.loads(l).items() if k not in TIMING}
            for l in (run / "metrics.jsonl").read_text().splitlines()]
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    weights = {f"{part}.{k}": v for part in ("student", "head") for k, v in ck[part].items()}
    return {"final": final, "rows": rows, "weights": weights, "step": ck["step"]}


def test_train_killed_anywhere_resumes_to_the_same_metrics(world, fs, tmp_path, train_cache):
    import torch

    ref = fs.run(train_args(train_cache, tmp_path / "ref"), tmp_path / "ref-log")
    assert ref.code == 0, ref.stderr
    want = _outcome(tmp_path / "ref")
    steps = want["step"] // 3  # optimizer steps per epoch
    points = {
        "epoch 1, mid-epoch (no checkpoint yet)": {"target": "tcskd.train.loop:tcs_loss", "n": steps // 2},
        "epoch 2, mid-epoch": {"target": "tcskd.train.loop:tcs_loss", "n": steps + steps // 2 + 1},
        "epoch 1 done, between epochs": {"target": "tcskd.train.loop:save_checkpoint", "n": 1, "when": "after"},
        "epoch 2's metrics written, checkpoint not": {"target": "tcskd.train.loop:save_checkpoint", "n": 2},
        "epoch 2's checkpoint torn (temporary file written)": {"target": "torch:save", "n": 2, "when": "after"},
        "run directory started, split.json not written": {"target": "tcskd.train.loop:write_json", "n": 1},
        "all epochs done, final.json not written": {"target": "tcskd.train.loop:write_json", "n": 2},
        "final.json written, curves not": {"target": "tcskd.train.loop:plot_curves", "n": 1},
    }
    for i, (name, fault) in enumerate(points.items()):
        out = tmp_path / f"run{i}"
        res = fs.run(train_args(train_cache, out), tmp_path / f"p{i}", [dict(fault, domain="call", action="kill")])
        assert res.killed, (name, res.stderr)
        tally("faults", "SIGKILL in tcskd train")
        if (out / "checkpoint.pt").exists():  # never torn
            torch.load(out / "checkpoint.pt", weights_only=True)
        again = fs.run(train_args(train_cache, out, "--resume"), tmp_path / f"p{i}-resume")
        assert again.code == 0, (name, again.stderr)
        got = _outcome(out)
        assert got["final"] == want["final"], name
        assert got["rows"] == want["rows"], name
        assert got["step"] == want["step"], name
        assert got["weights"].keys() == want["weights"].keys()
        for k in want["weights"]:
            assert torch.equal(got["weights"][k], want["weights"][k]), (name, k)
        assert (out / "curves.png").exists(), name
