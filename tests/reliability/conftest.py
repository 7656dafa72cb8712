"""Fixtures of the reliability suite: one fork server, one small world of data, teacher and
reference caches, and the session's counts of what was injected, detected and tried."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from _stores import map_teacher
from conftest import make_npz
from reliability._forkserver import ForkServer
from reliability._tally import DETAIL, KINDS, TOTALS

ARRAYS = ("features", "labels", "sample_index", "view_params", "row_ok", "chunk_done")
BASIS_ARRAYS = ("mean", "components", "eigenvalues", "explained_ratio", "coords")
CHUNK = 8
#: Options of the kinds of cache the suites build besides a global one: the first 3 PCA coordinates of a tiny map
#: teacher's 4 x 4 token grid (tcskd cache --tokens patch --dim 3; its basis fitted first on a sample of 20 images).
KINDS_OPTS = {"global": {}, "coords": {"tokens": "patch", "dim": 3, "basis_sample": 20}}


@pytest.fixture(scope="session")
def fs(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("forkserver"), torch.get_num_threads())
    yield server
    server.close()


@dataclass
class World:
    """Tiny data (48 train / 16 test 12-px images), a tiny teacher and reference stores."""

    root: Path
    data: str
    teacher: str
    fs: ForkServer
    refs: dict = field(default_factory=dict)
    dense_teacher: str = ""
    """A teacher with a token grid (a tiny map teacher) for the dense kinds (:data:`KINDS_OPTS`)."""

    def teacher_of(self, kind: str) -> str:
        return self.teacher if kind == "global" else self.dense_teacher

    def cache_args(self, fmt: str, root: Path, *extra: str, kind: str = "global") -> list[str]:
        dense = [a for k, v in KINDS_OPTS[kind].items() for a in (f"--{k.replace('_', '-')}", str(v))]
        return ["-q", "cache", "--data", self.data, "--teacher", self.teacher_of(kind), "--image-size", "16",
                "--chunk-rows", str(CHUNK), "--batch-size", "4", "--views", "2", "--format", fmt,
                "--device", "cpu", "--cache-root", str(root), *dense, *extra]

    def cache_config(self, fmt: str, root: Path, kind: str = "global", **kw):
        from tcskd.cache.build import CacheConfig

        base = dict(data=self.data, teacher=self.teacher_of(kind), image_size=16, chunk_rows=CHUNK, batch_size=4,
                    views=2, format=fmt, device="cpu", cache_root=str(root), **KINDS_OPTS[kind])
        base.update(kw)
        return CacheConfig(**base)

    def ref(self, fmt: str, kind: str = "global"):
        """(path, store events, zarr put events) of an uninterrupted `tcskd cache` run, recorded."""
        if (fmt, kind) not in self.refs:
            out = self.root / f"ref-{fmt}-{kind}"
            faults = [{"domain": "store", "action": "record"}]
            if fmt == "zarr":
                faults.append({"domain": "put", "action": "record"})
            res = self.fs.run(self.cache_args(fmt, out / "caches", kind=kind), out / "log", faults)
            assert res.code == 0, res.stderr
            path = Path(res.stdout.strip().splitlines()[-1])
            self.refs[fmt, kind] = (path, res.events("store"), res.events("put"))
        return self.refs[fmt, kind]

    def copy_ref(self, fmt: str, dst_root: Path) -> Path:
        """A private copy of the reference cache under ``dst_root``."""
        src = self.ref(fmt)[0]
        dst = dst_root / src.name
        shutil.copytree(src, dst)
        return dst


@pytest.fixture(scope="session")
def world(tmp_path_factory, fs, tiny_teacher) -> World:
    root = tmp_path_factory.mktemp("world")
    data = make_npz(root / "data.npz", n=48, n_test=16, size=12)
    return World(root, data, tiny_teacher, fs, dense_teacher=map_teacher(root / "dense-teacher"))


def read_arrays(path: Path, names=ARRAYS, group: str = "") -> dict[str, np.ndarray]:
    from tcskd.store.backends import open_store

    with open_store(path) as s:
        return {n: s.read(f"{group}{n}") for n in names if f"{group}{n}" in s}


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"array {name} differs"


def leftovers(root: Path) -> list[str]:
    """Temporary files or folders that a finished operation should not leave behind."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            if n.startswith(".tmp-") or n.endswith(".partial") or n.startswith(".old-"):
                out.append(os.path.join(dirpath, n))
    return out


def one_error_line(stderr: str) -> str:
    """The single `tcskd: error:` line of a refused command (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [l for l in stderr.strip().splitlines() if l.startswith("tcskd: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not any(TOTALS.values()):
        return
    tr = terminalreporter
    tr.section("reliability: what survives what")
    for kind in KINDS:
        tr.line(f"{kind}: {TOTALS[kind]}")
        for (k, what), n in sorted(DETAIL.items()):
            if k == kind:
                tr.line(f"    {what}: {n}")
    payload = {"totals": {k: TOTALS[k] for k in KINDS},
               "detail": {f"{k}/{w}": n for (k, w), n in sorted(DETAIL.items())}}
    target = os.environ.get("TCSKD_RELIABILITY_COUNTS")
    paths = [Path(target)] if target else []
    try:
        paths.append(config._tmp_path_factory.getbasetemp() / "reliability-counts.json")
    except Exception:
        pass
    for p in paths:
        try:
            p.write_text(json.dumps(payload, indent=2) + "\n")
            tr.line(f"counts written to {p}")
        except OSError:
            pass
