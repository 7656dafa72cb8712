"""Shared fixtures: tiny offline datasets and teachers, so stage tests take seconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from _s3 import s3_endpoint, s3_env_set  # noqa: F401  (the S3 endpoint fixtures)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


RELIABILITY = Path(__file__).parent / "reliability"


def pytest_collection_modifyitems(config, items):
    """The reliability suite (fault injection, kills, concurrency) is ``slow``: ``make test`` runs it,
    ``make test-fast`` (``-m "not slow"``) leaves it out; GPU tests skip without CUDA."""
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if RELIABILITY in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _hash_memo_in_tmp(tmp_path_factory):
    """Keep the session's sha256 memo (tcskd.data.sha256_file) and saved indexes (tcskd.data.index) out of the
    user's ~/.cache; subprocesses inherit them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TCSKD_HASH_MEMO", str(tmp_path_factory.mktemp("hash-memo") / "sha256-memo.json"))
        mp.setenv("TCSKD_INDEX", str(tmp_path_factory.mktemp("indexes")))
        yield


class TinyTeacher(nn.Module):
    """A small conv net: B x 3 x S x S -> B x 16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny runs: faster than two, and immune to a busy second core."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A torchscript teacher spec (16-d features)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "tiny.pt"
    torch.jit.script(TinyTeacher().eval()).save(str(path))
    return f"torchscript:{path}"


def make_npz(path: Path, n: int = 40, n_test: int = 12, size: int = 12, channels: int = 1,
             classes: int = 4, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels == 1 else (size, size, channels)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = np.arange(n) % classes
    xt = rng.integers(0, 256, (n_test, *shape), dtype=np.uint8)
    yt = np.arange(n_test) % classes
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt)
    return f"npz:{path}"


@pytest.fixture
def tiny_npz(tmp_path) -> str:
    return make_npz(tmp_path / "tiny.npz")


@pytest.fixture
def cache_root(tmp_path) -> Path:
    return tmp_path / "caches"


def one_line_error(main, argv: list[str], monkeypatch, capsys) -> str:
    """Run a ``python -m`` command's ``main`` on ``argv``: it must exit 2 with exactly one ``tcskd: error:`` line on
    stderr, which is returned."""
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tcskd: error: "), err
    return err[0]


def run_cli(args: list[str], env: dict | None = None, timeout: float = 300):
    """Run ``python -m tcskd ...`` in a subprocess; return the CompletedProcess."""
    import subprocess

    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "tcskd", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)
