"""tcskd cache --shard I/N: independent processes (a job array) filling one cache, and the Slurm scripts.

The processes are real ``tcskd`` commands forked from a pre-imported server (tests/reliability/_forkserver.py:
each child runs the CLI as ``python -m tcskd`` would), started together; faults (a SIGKILL before a chunk
write, a pause) come from tests/reliability/_faults.py.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from _stores import map_teacher
from conftest import make_npz
from reliability._forkserver import ForkServer

ROOT = Path(__file__).resolve().parent.parent
ARRAYS = ("features", "labels", "sample_index", "view_params", "row_ok", "chunk_done")
BASIS_ARRAYS = ("mean", "components", "eigenvalues", "explained_ratio")
#: 48 rows in chunks of 4: 12 chunks, 4 per shard of 3.
N_ROWS, CHUNK = 48, 4
KINDS = {"global": [], "coords": ["--tokens", "patch", "--dim", "3", "--basis-sample", "20"]}
#: The manifest's keys that hold a time (differ between any two runs).
TIMES = {"created"}
WRITE = "tcskd.cache.build:_write_chunk"


@pytest.fixture(scope="module")
def fs(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("shard-forkserver"), 1)
    yield server
    server.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("shard-world")
    data = make_npz(root / "data.npz", n=N_ROWS, n_test=8, size=12)
    return {"data": data, "global": tiny_teacher, "coords": map_teacher(root / "dense-teacher")}


def cache_args(world, kind: str, root: Path, *extra: str) -> list[str]:
    return ["cache", "--data", world["data"], "--teacher", world[kind], "--image-size", "16",
            "--chunk-rows", str(CHUNK), "--batch-size", "2", "--views", "2", "--device", "cpu", "--workers", "0",
            "--cache-root", str(root), *KINDS[kind], *extra]


def read_store(path: Path) -> tuple[dict[str, np.ndarray], dict, dict[str, np.ndarray], dict]:
    from tcskd.store.backends import open_store

    with open_store(path) as s:
        arrays = {n: s.read(n) for n in ARRAYS}
        attrs = {k: v for k, v in s.attrs("").items() if k not in TIMES}
        bases = {n: s.read(f"bases/pca/{n}") for n in BASIS_ARRAYS if f"bases/pca/{n}" in s}
        battrs = s.attrs("bases/pca") if "bases/pca" in s else {}
    return arrays, attrs, bases, {k: v for k, v in battrs.items() if k not in ("created", "fit_on_path")}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"array {name} differs"


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("tcskd: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def wait_for(path: Path, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_three_shards_one_killed_equal_one_process(fs, world, tmp_path, kind):
    ref = fs.run(["-q", *cache_args(world, kind, tmp_path / "ref")], tmp_path / "log-ref")
    assert ref.code == 0, ref.stderr
    ref_path = Path(ref.stdout.strip().splitlines()[-1])

    root = tmp_path / "caches"
    kill = [{"domain": "call", "target": WRITE, "n": 2, "action": "kill"}]  # shard 1 dies before its 2nd chunk
    pids = [(i, fs.spawn(cache_args(world, kind, root, "--shard", f"{i}/3"), tmp_path / f"log-{i}",
                         kill if i == 1 else None)) for i in range(3)]
    res = {i: fs.wait(pid, tmp_path / f"log-{i}") for i, pid in pids}
    assert res[1].killed, res[1].stderr
    for i in (0, 2):
        assert res[i].code == 0, res[i].stderr
        assert re.search(r"shard \d/3 is done; \d+ chunk\(s\) of other shards remain", res[i].stderr), res[i].stderr
    fitters = [i for i in range(3) if "fitting the token basis" in res[i].stderr]
    assert len(fitters) == (1 if kind == "coords" else 0)  # the creator fits it; the others wait, then load it
    path = root / ref_path.name  # --shard is not part of the key
    assert Path(res[0].stdout.strip().splitlines()[-1]) == path
    arrays, attrs, _, _ = read_store(path)
    assert arrays["chunk_done"].sum() == 12 - 3 and not attrs["complete"]  # shard 1 wrote 1 of its 4 chunks
    assert np.flatnonzero(~arrays["chunk_done"]).tolist() == [4, 7, 10]  # shard 1: chunks 1, 4, 7, 10

    other_n = fs.run(cache_args(world, kind, root, "--shard", "0/4"), tmp_path / "log-n4")
    assert other_n.code == 2
    assert "is being built in 3 shards" in error_line(other_n.stderr)

    rerun = fs.run(cache_args(world, kind, root, "--shard", "1/3"), tmp_path / "log-1b")
    assert rerun.code == 0, rerun.stderr
    assert f"computed {3 * CHUNK} rows" in rerun.stderr  # only its 3 missing chunks
    assert "the cache is complete" in rerun.stderr  # the last shard to finish completes it

    got, want = read_store(path), read_store(ref_path)
    assert_same(got[0], want[0])
    assert got[1] == want[1]
    assert_same(got[2], want[2])
    assert got[3] == want[3]
    assert len(got[2]) == (4 if kind == "coords" else 0)
    assert not Path(f"{path}.shards").exists()
    assert not [p for p in root.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".partial")]

    hit = fs.run(cache_args(world, kind, root), tmp_path / "log-hit")
    assert hit.code == 0 and "cache hit" in hit.stderr, hit.stderr
    again = fs.run(cache_args(world, kind, root, "--shard", "2/3"), tmp_path / "log-hit2")
    assert again.code == 0 and "cache hit" in again.stderr, again.stderr


@pytest.mark.slow
def test_same_shard_excluded_other_shards_not_and_wait_completes(fs, world, tmp_path):
    root = tmp_path / "caches"
    paused = tmp_path / "log-0"
    pause = [{"domain": "call", "target": WRITE, "n": 1, "action": "pause"}]
    first = fs.spawn(cache_args(world, "global", root, "--shard", "0/3"), paused, pause)
    wait_for(paused / "paused")  # shard 0 holds its lock, inside its first chunk write

    twin = fs.run(cache_args(world, "global", root, "--shard", "0/3"), tmp_path / "log-0b")
    assert twin.code == 3
    assert "shard 0/3 of cache" in error_line(twin.stderr) and "already being written" in twin.stderr
    whole = fs.run(cache_args(world, "global", root), tmp_path / "log-whole")
    assert whole.code == 3
    assert "shard 0/3 of cache" in error_line(whole.stderr)

    second = fs.run(cache_args(world, "global", root, "--shard", "1/3"), tmp_path / "log-1")
    assert second.code == 0, second.stderr  # another shard is not excluded
    assert f"computed {4 * CHUNK} rows" in second.stderr and "8 chunk(s) of other shards remain" in second.stderr

    waiter_log = tmp_path / "log-2"
    waiter = fs.spawn(cache_args(world, "global", root, "--shard", "2/3", "--wait"), waiter_log)
    end = time.monotonic() + 60
    err = waiter_log / "stderr"
    while not err.exists() or "waiting for 4 chunk(s) of other shards" not in err.read_text():
        assert time.monotonic() < end and fs.running(waiter)
        time.sleep(0.05)
    (paused / "release").write_text("")
    assert fs.wait(first, paused).code == 0
    done = fs.wait(waiter, waiter_log)
    assert done.code == 0, done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    arrays, attrs, _, _ = read_store(path)
    assert attrs["complete"] and arrays["chunk_done"].all()


@pytest.mark.slow
@pytest.mark.parametrize("value", ["3/3", "-1/2", "a/b", "0/0", "1", "1/2/3"])
def test_bad_shard_values_are_one_line(fs, world, tmp_path, value):
    res = fs.run(cache_args(world, "global", tmp_path / "caches", "--shard", value), tmp_path / "log")
    assert res.code == 2
    assert f"--shard must be I/N with N >= 1 and 0 <= I < N" in error_line(res.stderr)
    assert not (tmp_path / "caches").exists() or not list((tmp_path / "caches").iterdir())


def test_shard_is_not_in_the_key_and_parses():
    from tcskd.cache.build import shard_chunks
    from tcskd.cache.config import CacheConfig, parse_shard
    from tcskd.cache.create import identity_of

    assert parse_shard("2/5") == (2, 5) and parse_shard("0/1") == (0, 1)
    a, b = CacheConfig(), CacheConfig(shard="1/4")
    b.validate()
    assert identity_of(a, "fp", {"t": 1}) == identity_of(b, "fp", {"t": 1})
    assert shard_chunks(10, 1, 4) == [1, 5, 9]
    assert sorted(sum((shard_chunks(10, i, 4) for i in range(4)), [])) == list(range(10))


def test_second_creator_uses_the_first_store(world, tmp_path):
    """Two creators of one key: the rename that comes second fails and that process keeps the store in place."""
    from tcskd.cache.build import CacheConfig, open_split, plan_cache
    from tcskd.cache.create import create_cache_store
    from tcskd.store.backends import open_store

    cfg = CacheConfig(data=world["data"], teacher=world["global"], image_size=16, chunk_rows=CHUNK,
                      device="cpu", cache_root=str(tmp_path / "caches"))
    teacher, ident, key, path = plan_cache(cfg)
    source = open_split(cfg, ident)
    path.parent.mkdir(parents=True)
    create_cache_store(path, cfg, source, teacher, key, ident)
    with open_store(path, "a") as s:
        s["chunk_done"][0] = True  # the winner's work: must survive the loser's creation
    create_cache_store(path, cfg, source, teacher, key, ident)
    with open_store(path) as s:
        assert s.chunk_done().tolist() == [True] + [False] * 11
    assert sorted(p.name for p in path.parent.iterdir()) == [key]


# -- the Slurm scripts ------------------------------------------------------------

SLURM = ROOT / "scripts" / "slurm"
#: Values the scripts' variables take in a job (a 4-task array, two nodes of 8 GPUs).
ENV = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
       "SLURM_NNODES": "2", "GPUS": "8", "head": "node001", "HEAD": "node001"}

NUMS = {k: int(v) for k, v in ENV.items() if v.isdigit()}


def tcskd_args(script: Path, stage: str) -> list[list[str]]:
    """The arguments after ``tcskd STAGE`` of each command line of ``script`` running it (continuations joined,
    shell variables replaced by :data:`ENV` or their ``${VAR:-default}``)."""
    text = script.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        m = re.search(rf"(?:-m tcskd|\btcskd) {stage}\b(.*)", code)
        if not m:
            continue

        def var(mv: re.Match) -> str:
            name, default = mv.group(1) or mv.group(3), mv.group(2)
            return ENV.get(name, default if default is not None else f"X{name}")

        body = re.sub(r'"?\$\{\w+\[@\]\}"?', "", m.group(1))  # "${ARRAY[@]}": the empty array
        body = re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", var, body)
        body = re.sub(r"\$\(\((.*?)\)\)", lambda e: str(eval(e.group(1), {}, NUMS)), body)  # $((ID - 0))
        out.append(shlex.split(body))
    return out


@pytest.mark.parametrize("name", ["cache-array.sbatch", "train.sbatch"])
def test_slurm_scripts_are_valid_bash(name):
    script = SLURM / name
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert script.read_text().startswith("#!/bin/bash\n")


@pytest.mark.parametrize("name,stage", [("cache-array.sbatch", "cache"), ("train.sbatch", "train")])
def test_slurm_scripts_tcskd_lines_parse(name, stage):
    """Each tcskd command line of the scripts parses with the command's own options (types, choices), and the
    cache's --shard is a valid I/N."""
    from tcskd.cache.config import parse_shard
    from tcskd.cli import main

    commands = tcskd_args(SLURM / name, stage)
    assert commands, f"{name} runs no tcskd {stage}"
    for args in commands:
        ctx = main.commands[stage].make_context(stage, list(args), resilient_parsing=False)
        if stage == "cache":
            assert ctx.params["shard"] is not None
            assert parse_shard(ctx.params["shard"]) == (3, 4)


@pytest.mark.slow
def test_shard_refuses_hdf5_in_one_line(fs, world, tmp_path):
    res = fs.run(cache_args(world, "global", tmp_path / "caches", "--format", "hdf5", "--shard", "0/2"),
                 tmp_path / "log")
    assert res.code == 2
    assert "an HDF5 store has a single writer: use --format zarr with --shard" in error_line(res.stderr)
    assert not (tmp_path / "caches").exists() or not list((tmp_path / "caches").iterdir())
