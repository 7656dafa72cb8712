"""Scale-out on the CPU: 2 gloo processes under torchrun give the one-process results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tcskd.cache.store import open_store

from conftest import make_npz, run_cli

pytestmark = pytest.mark.slow
ARRAYS = ("features", "labels", "sample_index", "view_params", "row_ok", "chunk_done")


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tcskd", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _last_path(out: str) -> Path:
    return Path([l for l in out.strip().splitlines() if l.strip()][-1].strip())


def test_cache_two_ranks_equals_one_process(tmp_path, tiny_teacher):
    data = make_npz(tmp_path / "d.npz", n=70)
    args = ["cache", "--data", data, "--teacher", tiny_teacher, "--image-size", "16", "--chunk-rows", "8",
            "--batch-size", "4", "--views", "2", "--device", "cpu"]
    one = run_cli([*args, "--cache-root", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = torchrun([*args, "--cache-root", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr
    p1, p2 = _last_path(one.stdout), tmp_path / "two" / _last_path(one.stdout).name
    with open_store(p1) as a, open_store(p2) as b:
        for name in ARRAYS:
            assert a.read(name).tobytes() == b.read(name).tobytes(), name
        assert b.manifest["complete"]

    # Resume: chunks lost by a one-process run are finished by 2 ranks, and the reverse.
    def drop(chunks):
        with open_store(p2, "a") as s:
            for c in chunks:
                s["chunk_done"][c] = False
            s.set_attrs({"complete": False})

    def same():
        with open_store(p1) as a, open_store(p2) as b:
            assert a.read("features").tobytes() == b.read("features").tobytes()
            assert b.manifest["complete"]

    drop([3, 6])
    again = torchrun([*args, "--cache-root", str(tmp_path / "two")], nproc=2)
    assert again.returncode == 0, again.stderr
    same()
    drop([0, 5, 8])
    one_more = run_cli([*args, "--cache-root", str(tmp_path / "two")])
    assert one_more.returncode == 0, one_more.stderr
    same()


def test_hdf5_under_torchrun_is_refused(tmp_path, tiny_teacher):
    data = make_npz(tmp_path / "d.npz", n=8)
    r = torchrun(["cache", "--data", data, "--teacher", tiny_teacher, "--image-size", "16", "--format", "hdf5",
                  "--cache-root", str(tmp_path / "c")])
    assert r.returncode != 0 and "use --format zarr under torchrun" in r.stderr


def test_basis_two_ranks_equals_one_process(tmp_path, tiny_teacher):
    from tcskd.subspace.basis import load_basis

    data = make_npz(tmp_path / "d.npz", n=90)
    args = ["cache", "--data", data, "--teacher", tiny_teacher, "--image-size", "16", "--chunk-rows", "8",
            "--dtype", "float32", "--cache-root", str(tmp_path / "c")]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    path = _last_path(r.stdout)
    one = run_cli(["basis", "--cache", str(path), "--name", "one", "--dim", "8", "--coords", "--device", "cpu"])
    assert one.returncode == 0, one.stderr
    two = torchrun(["basis", "--cache", str(path), "--name", "two", "--dim", "8", "--coords", "--device", "cpu"])
    assert two.returncode == 0, two.stderr
    with open_store(path) as s:
        a, b = load_basis(s, "one"), load_basis(s, "two")
        np.testing.assert_allclose(b.eigenvalues, a.eigenvalues, rtol=1e-9)
        np.testing.assert_allclose(b.mean, a.mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.abs((a.components * b.components).sum(1)), 1.0, atol=1e-8)
        np.testing.assert_allclose(s.read("bases/two/coords"), s.read("bases/one/coords"), atol=1e-3)
        assert a.attrs["rows_used"] == b.attrs["rows_used"] == 90
    # NaN in one rank's share: every rank fails (none waits forever in all_reduce), naming the chunk.
    with open_store(path, "a") as s:
        s["features"][20, 0, 3] = np.nan
    bad = torchrun(["basis", "--cache", str(path), "--name", "bad", "--dim", "8", "--device", "cpu"], timeout=180)
    assert bad.returncode != 0
    assert "chunk 2 (rows 16-23)" in bad.stderr and "NaN/Inf" in bad.stderr, bad.stderr[-2000:]


def test_ddp_training_and_resume_in_one_process(tmp_path, tiny_teacher):
    data = make_npz(tmp_path / "d.npz", n=64, n_test=16, size=12)
    r = run_cli(["cache", "--data", data, "--teacher", tiny_teacher, "--image-size", "16",
                 "--cache-root", str(tmp_path / "c")])
    assert r.returncode == 0, r.stderr
    path = _last_path(r.stdout)
    r = run_cli(["basis", "--cache", str(path), "--dim", "6", "--coords", "--device", "cpu"])
    assert r.returncode == 0, r.stderr
    out = tmp_path / "run"
    args = ["train", "--cache", str(path), "--basis", "pca", "--dim", "6", "--epochs", "3", "--batch-size", "16",
            "--device", "cpu", "--out", str(out), "--select-every", "1", "--select-by", "error", "--drop-frac", "0.5", "--min-dim", "2"]
    two = torchrun([*args, "--stop-after", "2"])
    assert two.returncode == 0, two.stderr
    import json

    import torch

    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # one writer: rank 0
    assert rows[0]["active_coords"] == 6 and rows[1]["active_coords"] < 6
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2
    cfg = (out / "config.yaml").read_text()
    assert "world_size: 2" in cfg
    # The DDP checkpoint continues in a single process.
    one = run_cli([*args, "--resume"])
    assert one.returncode == 0, one.stderr
    final = json.loads((out / "final.json").read_text())
    assert 0.0 <= final["test_top1"] <= 1.0 and final["epochs"] == 3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_sync_bn_needs_cuda(tmp_path):
    from click.testing import CliRunner

    from tcskd.cli import main

    data = make_npz(tmp_path / "d.npz")
    r = CliRunner().invoke(main, ["train", "--data", data, "--method", "ce", "--device", "cpu", "--sync-bn",
                                  "--out", str(tmp_path / "run")])
    assert r.exit_code != 0 and "--sync-bn needs CUDA" in r.output
