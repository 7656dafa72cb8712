"""``wds:`` caches across processes: a SIGKILL and a rerun give the uninterrupted store; two torchrun ranks
each open only the shards of their own chunks and give the one-process store."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tcskd.cache.verify import verify_cache
from tcskd.store.backends import open_store

from conftest import run_cli
from test_data_wds import make_samples, write_shards

pytestmark = pytest.mark.slow
ARRAYS = ("features", "labels", "sample_index", "view_params", "row_ok", "chunk_done")
PER_SHARD = 8

# The CLI with each chunk's write slowed down, so that the test can kill it between chunks.
_SLOW_WRITES = """
import sys, time
import tcskd.cache.build as b
orig = b._write_chunk
def slow(store, c, *a):
    orig(store, c, *a)
    time.sleep(0.4)
b._write_chunk = slow
from tcskd.cli import main
main(sys.argv[1:])
"""


def _shards(tmp: Path, n_shards: int) -> str:
    """A ``wds:`` spec of ``n_shards`` train shards of :data:`PER_SHARD` samples and one test shard."""
    root = tmp / "wds"
    write_shards(root / "train", make_samples(n_shards * PER_SHARD, 0), PER_SHARD)
    write_shards(root / "test", make_samples(PER_SHARD, 1), PER_SHARD)
    return f"wds:{root}"


def _args(data: str, teacher: str) -> list[str]:
    return ["cache", "--data", data, "--teacher", teacher, "--image-size", "16", "--chunk-rows", str(PER_SHARD),
            "--batch-size", "4", "--views", "2", "--device", "cpu"]


def _last_path(out: str) -> Path:
    return Path([line for line in out.strip().splitlines() if line.strip()][-1].strip())


def _same_stores(a: Path, b: Path) -> None:
    with open_store(a) as x, open_store(b) as y:
        for name in ARRAYS:
            assert x.read(name).tobytes() == y.read(name).tobytes(), name
        assert y.manifest["complete"]


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, tiny_teacher):
    env = {"TCSKD_INDEX": str(tmp_path / "indexes")}
    args = _args(_shards(tmp_path, 8), tiny_teacher)
    ref = run_cli([*args, "--cache-root", str(tmp_path / "ref")], env=env)
    assert ref.returncode == 0, ref.stderr
    ref_path = _last_path(ref.stdout)
    killed = tmp_path / "killed" / ref_path.name

    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITES, *args, "--cache-root", str(tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ, **env))
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None and done < 3:
        time.sleep(0.05)
        try:
            with open_store(killed) as s:
                done = int(s.chunk_done().sum())
        except Exception:  # noqa: BLE001 - not created yet, or caught mid-write: look again
            continue
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open_store(killed) as s:
        assert 3 <= int(s.chunk_done().sum()) < 8 and not s.manifest["complete"]

    again = run_cli([*args, "--cache-root", str(tmp_path / "killed")], env=env)
    assert again.returncode == 0, again.stderr
    _same_stores(ref_path, killed)
    assert verify_cache(killed).ok


def _torchrun(args: list[str], log_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """2 gloo ranks running the CLI at debug level, each rank's stderr in its own file under ``log_dir``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "--log-dir", str(log_dir), "--redirects", "3", "-m", "tcskd", "-vv", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env))


def _opens_per_rank(log_dir: Path) -> dict[int, list[str]]:
    out = {}
    for f in log_dir.rglob("stderr.log"):
        rank = int(f.parent.name)
        out[rank] = re.findall(r"tcskd\.data\.wds: open shard (\S+)", f.read_text())
    return out


def test_two_ranks_open_only_their_shards_and_equal_one_process(tmp_path, tiny_teacher):
    env = {"TCSKD_INDEX": str(tmp_path / "indexes")}
    args = _args(_shards(tmp_path, 6), tiny_teacher)
    one = run_cli([*args, "--cache-root", str(tmp_path / "one")], env=env)  # also builds the index
    assert one.returncode == 0, one.stderr
    two = _torchrun([*args, "--cache-root", str(tmp_path / "two")], tmp_path / "logs", env)
    assert two.returncode == 0, two.stderr[-3000:]
    # Chunk c = shard c; rank r takes the chunks r, r + 2, ...: and opens those shards alone, once each.
    assert _opens_per_rank(tmp_path / "logs") == {
        0: [f"train/shard-0000{k}.tar" for k in (0, 2, 4)],
        1: [f"train/shard-0000{k}.tar" for k in (1, 3, 5)]}
    _same_stores(_last_path(one.stdout), tmp_path / "two" / _last_path(one.stdout).name)
