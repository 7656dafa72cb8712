"""Stage 1: the store, the cache command, hits, resume, locking and replayable views."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tcskd.cache.build import CacheConfig, build_cache
from tcskd.cache.subset import order_rows
from tcskd.store.registry import WriterLock, list_caches, resolve_cache
from tcskd.store.backends import iter_chunks, open_store
from tcskd.cache.verify import verify_cache
from tcskd.views import apply_view, teacher_views, view_params
from tcskd.cli import main
from tcskd.data import open_source
from tcskd.errors import LockedError, StoreError
from tcskd.teachers import load_teacher

from _stores import map_teacher
from conftest import make_npz, run_cli

ARRAYS = ("features", "labels", "sample_index", "view_params", "row_ok", "chunk_done")
#: The kinds of cache the suites below build: global features (the tiny teacher, 16-d), a token grid per view
#: (--tokens patch: a tiny map teacher, 4 x 4 tokens of 8 dims at 16 px) and its first 3 PCA coordinates (--dim).
KINDS = {"global": {}, "patch": {"tokens": "patch"}, "coords": {"tokens": "patch", "dim": 3, "basis_sample": 12}}
#: features' shape per row and view.
ROW = {"global": (16,), "patch": (16, 8), "coords": (16, 3)}


@pytest.fixture(scope="module")
def dense_teacher(tmp_path_factory) -> str:
    return map_teacher(tmp_path_factory.mktemp("dense-teacher"))


def _kind(kind: str, tiny_teacher: str, dense_teacher: str) -> tuple[str, dict, list[str]]:
    """(teacher spec, CacheConfig options, CLI options) of a kind of cache."""
    opts = KINDS[kind]
    cli = [a for k, v in opts.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return (tiny_teacher if kind == "global" else dense_teacher), dict(opts), cli


def _cfg(data, teacher, root, **kw) -> CacheConfig:
    base = dict(data=data, teacher=teacher, cache_root=str(root), image_size=16, chunk_rows=8, batch_size=4)
    base.update(kw)
    return CacheConfig(**base)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with open_store(path) as s:
        return {name: s.read(name) for name in ARRAYS}


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_store_round_trip(tmp_path, fmt):
    s = open_store(tmp_path / "c", "a", fmt)
    s.set_attrs({"schema_version": 1, "nested": {"a": [1, 2]}, "x": 1.5})
    a = s.create("features", (10, 2, 3), "float16", (4, 2, 3))
    a[0:4] = np.ones((4, 2, 3))
    s.create("bases/p/mean", (3,), "float64", (3,))
    s["bases/p/mean"][:] = [1.0, 2.0, 3.0]
    s.set_attrs({"complete": True}, "bases/p")
    s.close()
    r = open_store(tmp_path / "c")
    assert r.format == fmt
    assert r.manifest["nested"] == {"a": [1, 2]} and r.manifest["x"] == 1.5
    f = r.read("features")
    assert f.dtype == np.float16 and f.shape == (10, 2, 3)
    assert (f[:4] == 1).all() and (f[4:] == 0).all()
    assert r.bases() == ["p"]
    assert r.read("bases/p/mean").tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("fmt, kind", [("zarr", "global"), ("hdf5", "global"), ("zarr", "patch"),
                                       ("hdf5", "coords")])
def test_build_writes_schema_and_hits(tiny_npz, tiny_teacher, dense_teacher, cache_root, fmt, kind):
    teacher, opts, _ = _kind(kind, tiny_teacher, dense_teacher)
    cfg = _cfg(tiny_npz, teacher, cache_root, format=fmt, views=2, **opts)
    res = build_cache(cfg)
    assert not res.hit and res.rows_computed == 40
    src = open_source(tiny_npz, "train")
    a = _arrays(res.path)
    assert a["features"].shape == (40, 2, *ROW[kind]) and a["features"].dtype == np.float16
    perm = order_rows(40)  # npz: rows in the fixed shuffled order (--order auto)
    assert a["labels"].tolist() == src.labels[perm].tolist()
    assert a["sample_index"].tolist() == perm.tolist()
    assert a["row_ok"].all() and a["chunk_done"].all() and len(a["chunk_done"]) == 5
    assert np.isfinite(a["features"]).all() and np.abs(a["features"]).sum() > 0
    with open_store(res.path) as s:
        m = s.manifest
    assert m["complete"] and m["n_rows"] == 40 and m["views"] == 2 and m["dim"] == ROW[kind][-1]
    assert m["teacher_spec"] == teacher and m["data_spec"] == tiny_npz and m["schema_version"] == 1
    assert m["tokens"] == ("global" if kind == "global" else "patch") and m["coords_of"] == ("pca" if kind == "coords" else None)
    assert m["grid"] == (None if kind == "global" else [4, 4]) and (kind != "global") == (m["teacher_dim"] == 8)
    assert len(m["identity"]["teacher"]["weights_sha256"]) == 64

    # The same command again is a hit that computes nothing: no input, forward or write time (its timings).
    again = build_cache(cfg)
    assert again.hit and again.path == res.path and again.rows_computed == 0
    assert set(again.timings) == {"setup"} and {"inputs", "forward", "write"} <= set(res.timings)


def test_key_depends_on_inputs(tiny_npz, tiny_teacher, cache_root):
    a = build_cache(_cfg(tiny_npz, tiny_teacher, cache_root)).path
    b = build_cache(_cfg(tiny_npz, tiny_teacher, cache_root, views=2)).path
    c = build_cache(_cfg(tiny_npz, tiny_teacher, cache_root, split="test")).path
    d = build_cache(_cfg(tiny_npz, tiny_teacher, cache_root, dtype="float32")).path
    assert len({a, b, c, d}) == 4
    assert resolve_cache(a.name, cache_root) == a
    assert resolve_cache(str(a)) == a
    assert {r["key"] for r in list_caches(cache_root)} == {a.name, b.name, c.name, d.name}


def test_chunking_and_batching_do_not_change_features(tiny_npz, tiny_teacher, tmp_path):
    a = build_cache(_cfg(tiny_npz, tiny_teacher, tmp_path / "a", chunk_rows=8, batch_size=4, dtype="float32"))
    b = build_cache(_cfg(tiny_npz, tiny_teacher, tmp_path / "b", chunk_rows=16, batch_size=16, dtype="float32"))
    np.testing.assert_allclose(_arrays(a.path)["features"], _arrays(b.path)["features"], rtol=1e-5, atol=1e-6)


def test_views_replay_exactly(tiny_npz, tiny_teacher, cache_root):
    res = build_cache(_cfg(tiny_npz, tiny_teacher, cache_root, views=3, dtype="float32"))
    teacher = load_teacher(tiny_teacher, 16)
    src = open_source(tiny_npz, "train")
    with open_store(res.path) as s:
        params = s.read("view_params")
        feats = s.read("features")
    row_of = {int(i): r for r, i in enumerate(order_rows(40))}  # npz sample i is at this store row
    for sample in (0, 7, 23):
        row = row_of[sample]
        img = src.image(sample)
        expect = view_params(sample, img.shape[0], img.shape[1], 3, seed=0)
        np.testing.assert_array_equal(params[row], expect)
        assert (params[row, 0] == [0, 0, 1, 1, 0]).all()  # view 0: the centre crop of a square image
        x = teacher_views(img, params[row], 16).float() / 255
        with torch.inference_mode():
            f = teacher.features(x).numpy()
        np.testing.assert_allclose(feats[row], f, rtol=1e-4, atol=1e-5)
    # Random views differ from the centre crop and from each other across samples.
    assert not np.allclose(params[:, 1], params[:, 2])


@pytest.mark.parametrize("views", [1, 3])
def test_teacher_input_batches_equal_their_images(tiny_npz, views):
    # In-memory sources give the teacher whole batches; each image must be exactly its one-by-one views.
    from dataclasses import replace

    from tcskd.cache.build import collate_inputs, teacher_inputs

    src = open_source(tiny_npz, "train")
    cfg = CacheConfig(views=views, crop_scale=(0.25, 1.0))
    fast = teacher_inputs(src, cfg, 20)
    slow = teacher_inputs(replace(src, load_many=None), cfg, 20)
    rows = [3, 0, 17, 8, 21]
    a, b = collate_inputs(fast.__getitems__(rows)), collate_inputs(slow.__getitems__(rows))
    for got, want in zip(a[:4], b[:4]):
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
    assert a[1].shape == (5, views, src.channels, 20, 20) and a[1].dtype == torch.uint8 and a[4] == [""] * 5


def test_resize_left_to_the_device_gives_the_same_cache_on_the_cpu(tiny_npz, tiny_teacher, tmp_path, monkeypatch):
    # On a GPU, batches of in-memory images travel unresized and teacher_forward crops and resizes them on the
    # device; on the CPU that path must give exactly the cache of the usual one.
    import tcskd.cache.build as build

    ref = build_cache(_cfg(tiny_npz, tiny_teacher, tmp_path / "a", dtype="float32", batch_size=8))
    seen = []
    forward = build.teacher_forward
    monkeypatch.setattr(build, "resize_on_device", lambda device: True)
    monkeypatch.setattr(build, "teacher_forward", lambda t, x, d: seen.append(tuple(x.shape[-2:])) or forward(t, x, d))
    deferred = build_cache(_cfg(tiny_npz, tiny_teacher, tmp_path / "b", dtype="float32", batch_size=8))
    assert seen and all(s != (16, 16) for s in seen)  # the images did arrive at their own size
    a, b = _arrays(ref.path), _arrays(deferred.path)
    for name in ("features", "labels", "sample_index", "view_params", "row_ok"):
        np.testing.assert_array_equal(a[name], b[name])


def test_apply_view_crop_and_flip():
    img = torch.arange(4 * 6, dtype=torch.float32).reshape(1, 4, 6)
    exact = apply_view(img, [0.25, 1 / 3, 0.5, 1 / 3, 0.0], 2)
    assert torch.equal(exact, img[:, 1:3, 2:4])
    flipped = apply_view(img, [0.25, 1 / 3, 0.5, 1 / 3, 1.0], 2)
    assert torch.equal(flipped, img[:, 1:3, 2:4].flip(-1))


def test_lock_refuses_second_writer(tiny_npz, tiny_teacher, cache_root):
    from tcskd.cache.build import plan_cache

    cfg = _cfg(tiny_npz, tiny_teacher, cache_root)
    *_, path = plan_cache(cfg)
    with WriterLock(path):
        assert WriterLock.is_held(path)
        with pytest.raises(LockedError, match="another process"):
            build_cache(cfg)
    assert not WriterLock.is_held(path)
    assert build_cache(cfg).rows_computed == 40


def test_mismatched_manifest_is_refused(tiny_npz, tiny_teacher, cache_root):
    res = build_cache(_cfg(tiny_npz, tiny_teacher, cache_root))
    with open_store(res.path, "a") as s:
        ident = s.manifest["identity"]
        ident["teacher"]["image_size"] = 99
        s.set_attrs({"identity": ident})
    with pytest.raises(StoreError, match="other inputs"):
        build_cache(_cfg(tiny_npz, tiny_teacher, cache_root))


_KILL_SCRIPT = """
import sys, time
import tcskd.cache.build as b
orig = b._write_chunk
def slow(store, c, *a):
    orig(store, c, *a)
    print(f"chunk {c} written", flush=True)
    time.sleep(0.3)
b._write_chunk = slow
from tcskd.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt, kind", [("zarr", "global"), ("hdf5", "global"), ("zarr", "patch"),
                                       ("zarr", "coords"), ("hdf5", "coords")])
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, tiny_teacher, dense_teacher, fmt, kind):
    data = make_npz(tmp_path / "d.npz", n=64)
    teacher, _, extra = _kind(kind, tiny_teacher, dense_teacher)
    args = ["cache", "--data", data, "--teacher", teacher, "--image-size", "16", "--chunk-rows", "8",
            "--batch-size", "4", "--format", fmt, "--views", "2", *extra]
    ref = run_cli([*args, "--cache-root", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    ref_path = Path(ref.stdout.strip().splitlines()[-1])

    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, *args, "--cache-root", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("chunk 2 written"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_path = root / ref_path.name
    with open_store(killed_path) as s:
        done = s.chunk_done()
        assert 3 <= done.sum() < len(done)
        assert not s.manifest["complete"]

    again = run_cli([*args, "--cache-root", str(root)])
    assert again.returncode == 0, again.stderr
    a, b = _arrays(ref_path), _arrays(killed_path)
    for name in ARRAYS:
        assert a[name].tobytes() == b[name].tobytes(), name
    if fmt == "zarr":  # the chunk files themselves are identical
        for f in sorted((ref_path / "features" / "c").rglob("*")):
            if f.is_file():
                assert f.read_bytes() == (killed_path / f.relative_to(ref_path)).read_bytes()
    assert verify_cache(killed_path).ok
    if kind == "coords":  # the basis written before the kill (and kept by the resumed run) is the same
        with open_store(ref_path) as a, open_store(killed_path) as b:
            for arr in ("mean", "components", "eigenvalues"):
                assert a.read(f"bases/pca/{arr}").tobytes() == b.read(f"bases/pca/{arr}").tobytes()


@pytest.mark.parametrize("kind", list(KINDS))
def test_cli_ls_info_verify_and_corruption(tiny_npz, tiny_teacher, dense_teacher, cache_root, kind):
    runner = CliRunner()
    teacher, _, extra = _kind(kind, tiny_teacher, dense_teacher)
    r = runner.invoke(main, ["-q", "cache", "--data", tiny_npz, "--teacher", teacher, "--image-size", "16",
                             "--chunk-rows", "8", "--cache-root", str(cache_root), *extra])
    assert r.exit_code == 0, r.output
    path = Path(r.stdout.strip().splitlines()[-1])
    r = runner.invoke(main, ["cache", "ls", "--cache-root", str(cache_root)])
    assert path.name in r.stdout and "complete" in r.stdout
    r = runner.invoke(main, ["cache", "info", path.name, "--cache-root", str(cache_root)])
    info = json.loads(r.stdout)
    assert info["n_rows"] == 40 and info["bytes_per_image"] == int(np.prod(ROW[kind])) * 2
    r = runner.invoke(main, ["cache", "verify", str(path), "--recompute", "3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "3 recomputed" in r.stdout

    chunk = sorted((path / "features" / "c").rglob("*"))
    chunk = [c for c in chunk if c.is_file()][1]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    r = runner.invoke(main, ["cache", "verify", str(path)])
    assert r.exit_code != 0
    assert "unreadable" in r.stdout


def test_incomplete_cache_reported(tiny_npz, tiny_teacher, cache_root):
    res = build_cache(_cfg(tiny_npz, tiny_teacher, cache_root))
    with open_store(res.path, "a") as s:
        s["chunk_done"][2] = False
    rep = verify_cache(res.path)
    assert not rep.ok and "incomplete" in rep.problems[0]
    rows = {r["key"]: r for r in list_caches(cache_root)}
    assert rows[res.path.name]["complete"] is False
    # Running the command again recomputes only the missing chunk.
    import tcskd.cache.build as build

    with open_store(res.path, "a") as s:
        s.set_attrs({"complete": False})
    again = build.build_cache(_cfg(tiny_npz, tiny_teacher, cache_root))
    assert again.rows_computed == 8
    assert verify_cache(res.path).ok


def test_mnist5k_split_is_fixed_and_stratified():
    tr, te = open_source("builtin:mnist5k", "train"), open_source("builtin:mnist5k", "test")
    assert len(tr) == 4000 and len(te) == 1000
    assert set(tr.indices).isdisjoint(te.indices)
    assert np.bincount(te.labels).tolist() == [100] * 10
    assert open_source("builtin:mnist5k", "train").indices.tolist() == tr.indices.tolist()
    idx, img, lab = tr[5]
    assert img.shape == (28, 28, 1) and img.dtype == np.uint8 and 0 <= lab < 10


@pytest.mark.gpu
def test_cuda_path_matches_cpu(tiny_npz, tiny_teacher, tmp_path):
    cpu = build_cache(_cfg(tiny_npz, tiny_teacher, tmp_path / "cpu", device="cpu", dtype="float32"))
    gpu = build_cache(_cfg(tiny_npz, tiny_teacher, tmp_path / "gpu", device="cuda", dtype="float32"))
    a, b = _arrays(cpu.path)["features"], _arrays(gpu.path)["features"]
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert rel < 3e-2  # bf16 autocast on the GPU
