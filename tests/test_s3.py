"""Caches on S3, against a real S3 HTTP endpoint (moto's server, tests/_s3.py): the writer lease,
an unreachable endpoint, and the three stages through the CLI with a SIGKILL and a resume."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _leases import assert_one_of_eight_wins
from _s3 import free_port, s3_env
from conftest import make_npz, run_cli
from tcskd.errors import DataError, LockedError, StoreError, TcskdError
from tcskd.store.paths import PreconditionFailed, RemotePath, as_location, check_reachable
from tcskd.store.registry import Lease, LeaseInfo, WriterLock, lease_seconds

ARRAYS = ("features", "labels", "sample_index", "view_params", "row_ok", "chunk_done")

#: Holds the writer lock of argv[1] until killed; prints "held" once it has it.
HOLDER = """
import sys, time
from tcskd.store.paths import as_location
from tcskd.store.registry import WriterLock
with WriterLock(as_location(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(cache: str, env: dict[str, str], ttl: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, cache], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, **env, TCSKD_LEASE_SECONDS=str(ttl)))
    assert p.stdout.readline().strip() == "held"
    return p


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait()


def _foreign(host: str = "elsewhere", pid: int = 4242, expires_in: float = 60.0) -> bytes:
    return LeaseInfo("f" * 32, host, "", pid, time.time() + expires_in, 60.0).to_json()


@pytest.fixture(scope="module")
def forks(tmp_path_factory):
    """The reliability suite's fork server: ``tcskd ARGS`` exactly as ``python -m tcskd`` runs it, in a fork of
    a process that has already imported tcskd (milliseconds instead of seconds per command)."""
    import torch

    from reliability._forkserver import ForkServer

    server = ForkServer(tmp_path_factory.mktemp("s3-forkserver"), torch.get_num_threads())
    yield server
    server.close()


# -- the endpoint -----------------------------------------------------------------------------------

def test_endpoint_comes_from_aws_endpoint_url(s3_env_set):
    """s3fs (botocore) finds the endpoint in AWS_ENDPOINT_URL alone: what RemotePath writes is in the bucket."""
    url = s3_env_set.prefix("endpoint") + "/hello"
    RemotePath(url).write_bytes(b"over HTTP")
    assert s3_env_set.fs().cat_file(url) == b"over HTTP"
    assert RemotePath(url).read_bytes() == b"over HTTP"


def test_conditional_writes_are_enforced(s3_env_set):
    """The lease's atomic steps: If-None-Match creates once, If-Match replaces only the version read."""
    obj = RemotePath(s3_env_set.prefix("cond") + "/x.lease")
    assert obj.conditional_writes
    tag = obj.create_exclusive(b"one")
    with pytest.raises(FileExistsError):
        obj.create_exclusive(b"two")
    assert obj.read_versioned() == (b"one", tag)
    new = obj.replace_if(b"three", tag)
    with pytest.raises(PreconditionFailed):
        obj.replace_if(b"four", tag)  # an old version: another writer was first
    assert obj.read_versioned() == (b"three", new)


# -- the writer lease -------------------------------------------------------------------------------

def test_second_writer_refused_then_lease_gone(s3_env_set):
    cache = as_location(s3_env_set.prefix("lease") + "/0123abcd")
    lease_obj = str(cache) + ".lease"
    assert not WriterLock.is_held(cache)
    with WriterLock(cache) as first:
        held = LeaseInfo.from_json(s3_env_set.fs().cat_file(lease_obj))
        assert (held.writer, held.pid) == (first._lease.writer, os.getpid())
        assert WriterLock.is_held(cache)
        with pytest.raises(LockedError) as e:
            WriterLock(cache).__enter__()
        assert str(e.value) == (f"another process ({held.describe()}) is writing cache {cache}; "
                                f"try again when it has finished")
        assert e.value.exit_code == 3
    assert not s3_env_set.fs().exists(lease_obj)
    assert not WriterLock.is_held(cache)


def test_concurrent_writers_exactly_one_wins(s3_env_set):
    """8 writers ask at once for a free lease, then 8 at once for an expired one: one wins each time."""
    cache = as_location(s3_env_set.prefix("race") + "/0123abcd")
    for stage in ("free", "expired"):
        if stage == "expired":
            RemotePath(str(cache) + ".lease").write_bytes(_foreign(expires_in=-1))
        leases = [Lease(cache, ttl=30) for _ in range(8)]
        assert_one_of_eight_wins(cache, leases)


def test_expired_lease_is_taken_over(s3_endpoint, s3_env_set, caplog):
    """A writer that stops renewing (SIGSTOP: hung, or cut off) loses its lease after the TTL, not before."""
    cache = s3_endpoint.prefix("expiry") + "/0123abcd"
    p = _holder(cache, s3_endpoint.env, ttl=2)
    try:
        with pytest.raises(LockedError, match=f"another process \\(pid {p.pid} on host "):
            WriterLock(as_location(cache)).__enter__()
        os.kill(p.pid, signal.SIGSTOP)
        held, _, _ = Lease(as_location(cache)).read()
        assert held.pid == p.pid and held.stale() is None  # alive and in time: still live
        time.sleep(max(0.0, held.expires - time.time()) + 0.1)
        with caplog.at_level(logging.INFO, logger="tcskd.store.registry"), WriterLock(as_location(cache)) as lock:
            now, _, _ = Lease(as_location(cache)).read()
            assert (now.writer, now.pid) == (lock._lease.writer, os.getpid())
        assert f"taking over the lease of {cache} (expired)" in caplog.text
    finally:
        _stop(p)


def test_same_host_dead_pid_is_stale_at_once(s3_endpoint, s3_env_set, caplog):
    cache = s3_endpoint.prefix("deadpid") + "/0123abcd"
    p = _holder(cache, s3_endpoint.env, ttl=600)
    p.kill()
    assert p.wait() == -signal.SIGKILL
    held, _, _ = Lease(as_location(cache)).read()
    assert held.pid == p.pid and held.expires > time.time() + 500  # far from expiry
    assert held.stale() == f"its process {p.pid} on this host is gone"
    assert not WriterLock.is_held(as_location(cache))
    with caplog.at_level(logging.INFO, logger="tcskd.store.registry"), WriterLock(as_location(cache)):
        assert Lease(as_location(cache)).read()[0].pid == os.getpid()
    assert f"(its process {p.pid} on this host is gone)" in caplog.text


def test_other_host_lease_is_not_judged_by_pid(s3_env_set):
    """A lease of another host is live until it expires, whatever pid it names."""
    cache = as_location(s3_env_set.prefix("otherhost") + "/0123abcd")
    RemotePath(str(cache) + ".lease").write_bytes(_foreign(pid=2 ** 22 + 7))
    with pytest.raises(LockedError, match=r"another process \(pid 4194311 on host elsewhere, lease until"):
        WriterLock(cache).__enter__()
    assert WriterLock.is_held(cache)


def test_renewal_keeps_a_long_write_alive(s3_env_set, monkeypatch):
    """Held for 2.5 TTLs: the lease never expires, and a second writer is refused at the end."""
    monkeypatch.setenv("TCSKD_LEASE_SECONDS", "2")
    cache = as_location(s3_env_set.prefix("renew") + "/0123abcd")
    seen: list[float] = []
    with WriterLock(cache) as lock:
        t_end = time.time() + 5.0
        while time.time() < t_end:
            held, _, _ = Lease(cache).read()
            assert held.writer == lock._lease.writer and held.expires > time.time()
            seen.append(held.expires)
            time.sleep(0.1)
        with pytest.raises(LockedError):
            WriterLock(cache).__enter__()
    assert seen[-1] > seen[0] + 3.0  # renewed (every ttl/3) throughout
    assert not RemotePath(str(cache) + ".lease").exists()


def test_lost_lease_is_reported_and_left_alone(s3_env_set, monkeypatch):
    """If another writer takes the lease (ours was not renewed in time), leaving says so and keeps theirs."""
    monkeypatch.setenv("TCSKD_LEASE_SECONDS", "0.6")
    cache = as_location(s3_env_set.prefix("lost") + "/0123abcd")
    theirs = _foreign()
    with pytest.raises(LockedError, match=r"was taken over by pid 4242 on host elsewhere.*tcskd cache verify"):
        with WriterLock(cache):
            RemotePath(str(cache) + ".lease").write_bytes(theirs)
            time.sleep(1.5)  # several ttl/3: a renewal has found the lease changed
    assert RemotePath(str(cache) + ".lease").read_bytes() == theirs


def test_lease_without_conditional_writes():
    """A store without conditional writes (memory://): check, write, read back; the same refusals."""
    import uuid

    cache = as_location(f"memory://lease-{uuid.uuid4().hex[:8]}/caches/0123abcd")
    assert not cache.conditional_writes
    with WriterLock(cache) as lock:
        assert Lease(cache).read()[0].writer == lock._lease.writer
        with pytest.raises(LockedError, match=f"another process \\(pid {os.getpid()} on host "):
            WriterLock(cache).__enter__()
        lock._lease.renew()
    assert not RemotePath(str(cache) + ".lease").exists()


def test_lease_seconds_from_the_environment(monkeypatch):
    monkeypatch.delenv("TCSKD_LEASE_SECONDS", raising=False)
    assert lease_seconds() == 60.0
    monkeypatch.setenv("TCSKD_LEASE_SECONDS", "2.5")
    assert lease_seconds() == 2.5
    for bad in ("0", "-3", "soon", "nan"):
        monkeypatch.setenv("TCSKD_LEASE_SECONDS", bad)
        with pytest.raises(TcskdError, match=f"TCSKD_LEASE_SECONDS must be a number of seconds > 0, not '{bad}'"):
            lease_seconds()


# -- an unreachable endpoint ------------------------------------------------------------------------

def test_unreachable_endpoint_fails_fast_in_one_line(monkeypatch):
    import s3fs  # noqa: F401  (time the probe, not the import)

    closed = f"http://127.0.0.1:{free_port()}"
    for k, v in s3_env(closed).items():
        monkeypatch.setenv(k, v)
    t = time.perf_counter()
    with pytest.raises(StoreError) as e:
        check_reachable("s3://nowhere-cache/caches")
    secs = time.perf_counter() - t
    assert str(e.value).startswith(f'cannot reach s3://nowhere-cache/caches: Could not connect to the endpoint URL: '
                                   f'"{closed}/nowhere-cache/caches"')
    assert "\n" not in str(e.value)
    # One attempt: botocore's default retries (legacy, 5 attempts) take ~11 s per request here.
    assert secs < 5, secs
    with pytest.raises(DataError, match="cannot reach s3://nowhere-data/shards/"):
        check_reachable("s3://nowhere-data/shards/", DataError)


def test_missing_credentials_are_one_line(s3_endpoint, monkeypatch, tmp_path):
    for k, v in s3_endpoint.env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StoreError, match=r"^cannot access s3://no-credentials/caches: Unable to locate credentials$"):
        check_reachable("s3://no-credentials/caches")


@pytest.mark.slow
def test_unreachable_endpoint_through_the_cli(forks, tmp_path, tiny_teacher):
    """A closed local port as the endpoint: exit 2 and one line, for a cache root given as an option
    (python -m tcskd) and through TCSKD_CACHE."""
    env = s3_env(f"http://127.0.0.1:{free_port()}")
    data = make_npz(tmp_path / "tiny.npz")
    t = time.perf_counter()
    r = run_cli(["-q", "cache", "--data", data, "--teacher", tiny_teacher, "--image-size", "16",
                 "--cache-root", "s3://nowhere/caches"], env=env, timeout=120)
    secs = time.perf_counter() - t
    errors = [line for line in r.stderr.splitlines() if line.startswith("tcskd:")]  # torch warns on stderr too
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and errors[0].startswith("tcskd: error: cannot reach s3://nowhere/caches/"), r.stderr
    print(f"tcskd cache against a closed port: {secs:.1f} s")
    r = forks.run(["-q", "basis", "--cache", "0123abcd"], tmp_path / "basis",
                  env={**env, "TCSKD_CACHE": "s3://nowhere/caches"})
    assert r.code == 2
    assert r.stderr.strip().splitlines() == [
        f'tcskd: error: cannot reach s3://nowhere/caches/0123abcd/store.h5: Could not connect to the endpoint URL: '
        f'"{env["AWS_ENDPOINT_URL"]}/nowhere/caches/0123abcd/store.h5" (check the endpoint, e.g. AWS_ENDPOINT_URL, '
        f'and the network)']


# -- the stages through the CLI ---------------------------------------------------------------------

def _arrays(path: str) -> dict[str, bytes]:
    from tcskd.store.backends import open_store

    with open_store(as_location(path)) as s:
        return {name: np.asarray(s.read(name)).tobytes() for name in ARRAYS}


def _wait_for(path: Path, what: str = "", timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and what in (text := path.read_text()):
            return text
        time.sleep(0.05)
    raise AssertionError(f"no {what!r} in {path} after {timeout} s")


@pytest.mark.slow
def test_cache_on_s3_killed_resumed_verified_and_read_back(s3_endpoint, s3_env_set, forks, tiny_teacher, tmp_path):
    """tcskd cache writes to s3://; a second writer is refused (exit 3, one line) while the first holds the
    lease; the first is SIGKILLed after 2 of 5 chunks; a rerun waiting with --wait takes the dead writer's
    lease at once and resumes to a store equal to an uninterrupted one; verify, ls, basis and train read
    it; a third run is a cache hit."""
    from tcskd.store.backends import open_store

    s3 = s3_endpoint
    data = make_npz(tmp_path / "tiny.npz", n=40)
    env = {**s3.env, "TCSKD_LEASE_SECONDS": "30"}
    args = ["cache", "--data", data, "--teacher", tiny_teacher, "--image-size", "16", "--chunk-rows", "8",
            "--batch-size", "4", "--device", "cpu"]
    ref_root, root = s3.prefix("ref"), s3.prefix("kill")

    # The uninterrupted reference, with its sequence of store writes recorded.
    r = forks.run([*args, "--cache-root", ref_root], tmp_path / "ref", [{"domain": "store", "action": "record"}],
                  env=env)
    assert r.code == 0, r.stderr
    ref = r.stdout.strip().splitlines()[-1]
    assert ref.startswith(ref_root + "/")
    n = next(i for i, label in r.events("store") if label == "setitem:chunk_done:2")
    path = f"{root}/{ref.rsplit('/', 1)[1]}"

    # The same command under another root, paused before chunk 2 is marked done.
    first = forks.spawn([*args, "--cache-root", root], tmp_path / "kill", [{"domain": "store", "action": "pause",
                                                                            "n": n}], env=env)
    try:
        _wait_for(tmp_path / "kill" / "paused")
        with open_store(as_location(path)) as s:
            assert s.chunk_done().tolist() == [True, True, False, False, False]
            assert not s.manifest["complete"]
        assert WriterLock.is_held(as_location(path))

        r = run_cli(["-q", *args, "--cache-root", root], env=env)  # python -m tcskd, as a user types it
        assert r.returncode == 3
        lines = [line for line in r.stderr.splitlines() if line.startswith("tcskd:")]  # torch warns on stderr too
        assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
        assert re.fullmatch(rf"tcskd: error: another process \(pid {first} on host {re.escape(socket.gethostname())}, "
                            rf"lease until \d\d:\d\d:\d\d UTC\) is writing cache {re.escape(path)}; try again when it "
                            rf"has finished", lines[0]), r.stderr

        waiting = forks.spawn([*args, "--cache-root", root, "--wait"], tmp_path / "wait", env=env)
        _wait_for(tmp_path / "wait" / "stderr", "waiting for the writer of")
        os.kill(first, signal.SIGKILL)
    finally:
        killed = forks.wait(first, tmp_path / "kill")
    assert killed.killed
    r = forks.wait(waiting, tmp_path / "wait")
    assert r.code == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == path
    assert f"taking over the lease of {path} (its process {first} on this host is gone)" in r.stderr
    assert "computed 24 rows" in r.stderr  # chunks 2, 3 and 4 only

    assert _arrays(path) == _arrays(ref)
    assert not s3.fs().exists(path + ".lease")

    r = forks.run(["cache", "verify", path, "--recompute", "4", "--device", "cpu"], tmp_path / "verify", env=env)
    assert r.code == 0 and r.stdout.startswith(f"ok: {path} (40 rows checked, 4 recomputed"), r.stderr

    # fsspec's own variable configures the endpoint as well (no AWS_ENDPOINT_URL in this one; fsspec reads
    # its variables on import, so this is a fresh python -m tcskd).
    fs_env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    fs_env.update({k: v for k, v in env.items() if k != "AWS_ENDPOINT_URL"}, FSSPEC_S3_ENDPOINT_URL=s3.url)
    r = subprocess.run([sys.executable, "-m", "tcskd", "cache", "ls", "--cache-root", root, "--json"],
                       capture_output=True, text=True, env=fs_env, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(row["key"], row["complete"], row["writing"], row["rows"]) for row in rows] == [
        (path.rsplit("/", 1)[1], True, False, 40)]

    r = forks.run(["basis", "--cache", path, "--dim", "4", "--device", "cpu"], tmp_path / "basis", env=env)
    assert r.code == 0, r.stderr
    with open_store(as_location(path)) as s:
        assert s.bases() == ["pca"] and s.read("bases/pca/components").shape == (4, 16)
    run = tmp_path / "run"
    r = forks.run(["train", "--cache", path, "--student", "python:reliability._students:tiny", "--epochs", "1",
                   "--batch-size", "8", "--dim", "4", "--device", "cpu", "--out", str(run)], tmp_path / "train",
                  env=env)
    assert r.code == 0, r.stderr
    final = json.loads((run / "final.json").read_text())
    assert (final["cache"], final["epochs"], final["train_images"], final["dim"]) == (path, 1, 36, 4)

    r = forks.run([*args, "--cache-root", root], tmp_path / "hit", env=env)
    assert r.code == 0 and r.stdout.strip().splitlines()[-1] == path, r.stderr
    assert "cache hit (nothing recomputed)" in r.stderr
    assert not s3.fs().exists(path + ".lease")


def test_listing_two_caches_and_a_missing_bucket(s3_env_set, tiny_npz, tiny_teacher, tmp_path):
    """`cache ls` sorts remote caches like local ones; a cache root in a bucket that does not exist is one
    StoreError, and no bucket is created on a typo."""
    from tcskd.cache.build import CacheConfig, build_cache
    from tcskd.errors import StoreError
    from tcskd.store.registry import list_caches

    root = s3_env_set.prefix("ls")
    keys = {build_cache(CacheConfig(data=tiny_npz, teacher=tiny_teacher, split=split, image_size=16,
                                    cache_root=root, device="cpu", workers=0)).key for split in ("train", "test")}
    assert [row["key"] for row in list_caches(root)] == sorted(keys)
    fs = s3_env_set.fs()
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' of s3://no-such-bucket/caches does not exist"):
        build_cache(CacheConfig(data=tiny_npz, teacher=tiny_teacher, image_size=16,
                                cache_root="s3://no-such-bucket/caches", device="cpu", workers=0))
    assert not fs.exists("no-such-bucket")
