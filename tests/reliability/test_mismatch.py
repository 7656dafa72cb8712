"""Mismatches: a basis from another cache, a cache whose teacher or preprocessing differs from what a
run says, a store written by a newer schema version. Each is a clear one-line refusal."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from reliability._students import SPEC
from reliability._tally import tally
from reliability.conftest import one_error_line


def _cli(args):
    from tcskd.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _refused(r, pattern: str, code: int = 2) -> None:
    assert r.exit_code == code, (r.output, r.exception)
    line = one_error_line(r.stderr)
    assert re.search(pattern, line), line
    tally("bad_inputs", "mismatch refused")


@pytest.fixture(scope="module")
def caches(world, tmp_path_factory):
    """Two caches of the same data (train split; test split) with a PCA basis each, and a copied teacher."""
    from tcskd.cache.build import build_cache
    from tcskd.subspace.fit import BasisConfig, fit_basis

    root = tmp_path_factory.mktemp("mismatch")
    teacher = root / "teacher.pt"
    shutil.copy(world.teacher.split(":", 1)[1], teacher)
    a = build_cache(world.cache_config("zarr", root / "caches", teacher=f"torchscript:{teacher}", views=1)).path
    b = build_cache(world.cache_config("zarr", root / "caches", teacher=f"torchscript:{teacher}", views=1,
                                       split="test")).path
    for c in (a, b):
        fit_basis(BasisConfig(cache=str(c), name="pca", dim=8, device="cpu"))
    return root, a, b, teacher


def _train(cache, out, *extra):
    return ["train", "--cache", cache, "--basis", "pca", "--student", SPEC, "--epochs", "2", "--batch-size", "8",
            "--device", "cpu", "--out", out, *extra]


def test_basis_copied_from_another_cache_is_refused(caches, tmp_path):
    root, a, b, _ = caches
    victim = tmp_path / b.name
    shutil.copytree(b, victim)
    shutil.rmtree(victim / "bases" / "pca")
    shutil.copytree(a / "bases" / "pca", victim / "bases" / "pca")  # same dimension, another cache's basis
    _refused(_cli(_train(victim, tmp_path / "run")), r"basis 'pca' .* written into cache .*copied from another cache")
    r = _cli(["cache", "verify", victim])
    assert r.exit_code == 1 and "copied from another cache" in r.output
    tally("bad_inputs", "mismatch refused")
    assert not (tmp_path / "run").exists()


def test_resume_on_another_cache_is_refused(caches, tmp_path):
    root, a, b, _ = caches
    out = tmp_path / "run"
    r = _cli(_train(a, out, "--stop-after", "1"))
    assert r.exit_code == 0, r.output
    _refused(_cli(_train(b, out, "--resume")), r"cannot resume: the run used cache")


def test_online_teacher_changed_since_caching_is_refused(caches, tmp_path):
    from conftest import TinyTeacher

    root, a, _, teacher = caches
    victim_root = tmp_path / "caches"
    shutil.copytree(a, victim_root / a.name)
    saved = teacher.read_bytes()
    try:
        torch.manual_seed(1)
        torch.jit.script(TinyTeacher().eval()).save(str(teacher))  # same spec and shapes, other weights
        _refused(_cli(_train(victim_root / a.name, tmp_path / "run", "--method", "online")),
                 r"is not the one cache .* was built with \(differs in: weights_sha256\)")
        assert not (tmp_path / "run").exists()
        r = _cli(["cache", "verify", victim_root / a.name, "--recompute", "2", "--device", "cpu"])
        assert r.exit_code == 1 and "no longer matches" in r.output, r.output
        tally("bad_inputs", "mismatch refused")
    finally:
        teacher.write_bytes(saved)


def test_cache_with_other_preprocessing_under_the_same_key_is_refused(world, tmp_path):
    from tcskd.cache.build import build_cache
    from tcskd.store.backends import open_store

    cfg = world.cache_config("zarr", tmp_path / "caches", views=1, limit=8)
    path = build_cache(cfg).path
    with open_store(path, "a") as s:
        ident = s.manifest["identity"]
        ident["teacher"]["std"] = [1.0, 1.0, 1.0]
        s.set_attrs({"identity": ident, "complete": False})
    args = world.cache_args("zarr", tmp_path / "caches", "--limit", "8")
    args[args.index("--views") + 1] = "1"
    _refused(_cli(args), r"built from other inputs \(differs in: teacher\); refusing to mix")


def test_newer_schema_is_refused_everywhere(world, tmp_path):
    from tcskd.store.backends import open_store

    cache = world.copy_ref("zarr", tmp_path / "caches")
    with open_store(cache, "a") as s:
        s.set_attrs({"schema_version": 99})
    upgrade = r"written with store schema 99; this tcskd reads schema 1 or older: upgrade tcskd"
    _refused(_cli(world.cache_args("zarr", tmp_path / "caches")), upgrade)
    _refused(_cli(["cache", "info", cache]), upgrade)
    _refused(_cli(["basis", "--cache", cache, "--device", "cpu"]), upgrade)
    _refused(_cli(_train(cache, tmp_path / "run")), upgrade)
    r = _cli(["cache", "verify", cache])
    assert r.exit_code == 1 and "upgrade tcskd" in r.output
    r = _cli(["cache", "ls", "--cache-root", tmp_path / "caches", "--json"])
    row = json.loads(r.output.strip().splitlines()[-1])
    assert r.exit_code == 0 and "upgrade tcskd" in row["error"] and row["complete"] is False
    tally("bad_inputs", "mismatch refused", 2)


def test_fit_on_a_cache_of_another_dimension_is_refused(world, caches, tmp_path):
    from tcskd.cache.build import build_cache

    root, a, _, _ = caches
    other = tmp_path / "other.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                         torch.nn.Flatten()).eval()).save(str(other))
    c = build_cache(world.cache_config("zarr", tmp_path / "caches", teacher=f"torchscript:{other}", views=1)).path
    victim = tmp_path / a.name
    shutil.copytree(a, victim)
    _refused(_cli(["basis", "--cache", victim, "--fit-on", c, "--name", "x", "--device", "cpu"]),
             r"4-dimensional features but cache .* has 16")
