"""Writers' locks: one lock per basis (bases of one cache fitted side by side, beside training runs), the lease
file where a file system has no flock, and stale holders judged by host and expiry."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from _stores import low_rank_features, make_feature_cache
from _leases import assert_one_of_eight_wins
from tcskd.errors import LockedError, StoreError
from tcskd.store import bases as store_bases
from tcskd.store import registry
from tcskd.store.backends import open_store
from tcskd.store.bases import load_basis
from tcskd.store.registry import (BasisLock, Lease, LeaseInfo, LocalLeaseFile, WriterLock, holder_gone,
                                  this_holder)
from tcskd.subspace.fit import BasisConfig, fit_basis
from tcskd.results import TIMING_KEYS

BASIS_ARRAYS = ("mean", "components", "eigenvalues", "explained_ratio", "coords")


def _fit(cache: Path, name: str, **kw) -> dict:
    return fit_basis(BasisConfig(cache=str(cache), name=name, device="cpu", plot=False, **kw))


def _arrays(cache: Path, name: str) -> dict[str, np.ndarray]:
    with open_store(cache) as s:
        return {a: s.read(f"bases/{name}/{a}") for a in BASIS_ARRAYS if f"bases/{name}/{a}" in s}


def _assert_same_basis(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k


@pytest.fixture
def cache(tmp_path) -> Path:
    return make_feature_cache(tmp_path / "caches" / "c0ffee", low_rank_features(n=96, d=12, rank=4, seed=1),
                              chunk_rows=32)


def _in_thread(fn) -> BaseException | object:
    """``fn()`` in another thread (another holder of the same process): its result or the exception it raised."""
    box: list = [None]

    def run() -> None:
        try:
            box[0] = fn()
        except BaseException as e:  # handed back to the test
            box[0] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return box[0]


# -- one lock per basis ------------------------------------------------------------------------------

def test_writers_of_other_bases_are_not_blocked_the_same_name_is(cache):
    with BasisLock(cache, "a"):
        _fit(cache, "b", dim=3)  # another basis: written while "a" is being written
        with pytest.raises(LockedError) as e:
            _fit(cache, "a", dim=3)
        assert str(e.value) == (f"another process (pid {os.getpid()}) is writing basis 'a' of cache {cache}; "
                                f"try again when it has finished")
        assert e.value.exit_code == 3
        # the cache's own writer cannot start while a basis is being written beside it
        with pytest.raises(LockedError, match=f"is writing cache {cache}; try again"):
            WriterLock(cache).__enter__()
        assert not WriterLock.is_held(cache)  # a basis writer does not write the cache's arrays
    with open_store(cache) as s:
        assert s.bases() == ["b"]
    assert sorted(p.name for p in cache.parent.iterdir()) == ["c0ffee", "c0ffee.basis-a.lock", "c0ffee.basis-b.lock",
                                                            "c0ffee.lock"]


def test_a_cache_writer_refuses_basis_writers_and_wait_waits(cache):
    with WriterLock(cache):
        with pytest.raises(LockedError, match=rf"another process \(pid {os.getpid()}\) is writing cache {cache}; try"):
            _fit(cache, "a", dim=2)
    # --wait: waits for the writer of the same basis, then writes
    held = BasisLock(cache, "a").__enter__()
    timer = threading.Timer(0.5, held.__exit__, args=(None,))
    t0 = time.monotonic()
    timer.start()
    res = _fit(cache, "a", dim=2, wait=True)
    assert time.monotonic() - t0 >= 0.5 and res["k"] == 2
    timer.join()


def test_hdf5_cache_takes_one_basis_writer(tmp_path):
    cache = make_feature_cache(tmp_path / "h5cache", low_rank_features(n=64, d=8, rank=3), fmt="hdf5", chunk_rows=32)
    with BasisLock(cache, "a", "hdf5"):
        with pytest.raises(LockedError, match=rf"is writing a basis of HDF5 cache {cache} \(an HDF5 file takes one "
                                              r"writer at a time\); try again"):
            _fit(cache, "b", dim=2)
    assert _fit(cache, "b", dim=2)["k"] == 2


def test_leftovers_of_a_basis_being_written_are_kept(cache):
    """A hidden group of basis x is removed by the next writer of another basis only when x's lock is free."""
    arrays = {"mean": np.zeros(12), "components": np.eye(12)[:2], "eigenvalues": np.ones(2),
              "explained_ratio": np.array([0.5, 1.0])}
    with open_store(cache, "a") as s:
        for name in ("x", "y"):
            tmp = f"bases/.tmp-{name}-{4242}"
            s.require_group(tmp)
            s.create(f"{tmp}/mean", (12,), "float64", (12,))[...] = arrays["mean"]
    partial = cache / "bases" / ".tmp-x-4242" / "mean" / "zarr.0123.partial"  # a file x's writer is writing
    partial.write_bytes(b"{")
    with BasisLock(cache, "x"):  # x is being written; y's writer was killed
        _fit(cache, "b", dim=2)
        with open_store(cache) as s:
            assert s.children("bases") == [".tmp-x-4242", "b"]
        assert partial.exists()
    _fit(cache, "x", dim=2)
    with open_store(cache) as s:
        assert s.children("bases") == ["b", "x"]


def test_readers_ignore_a_folder_a_writer_is_filling_or_removing(cache):
    """A basis writer's hidden folder before its metadata lands (or while removed) is no member, and no warning."""
    import warnings

    _fit(cache, "a", dim=2)
    (cache / "bases" / ".tmp-b-4242" / "mean").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_store(cache) as s:
            assert s.bases() == ["a"] and s.children("bases") == ["a"]


def test_verify_ignores_the_locks_beside_the_cache(cache):
    from tcskd.cache.verify import verify_cache

    with BasisLock(cache, "a"), WriterLock(cache.parent / "other"):
        assert verify_cache(cache).problems == []
    assert (cache.parent / "c0ffee.basis-a.lock").exists()
    assert verify_cache(cache).problems == []


# -- no flock: a lease file ----------------------------------------------------------------------------

def _no_flock(monkeypatch, code: int = errno.ENOSYS) -> list:
    """fcntl.flock fails with ``code``, as on a network file system without locks; returns the calls."""
    calls = []

    def flock(fd, op):
        calls.append(op)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)
    return calls


@pytest.fixture
def no_flock(monkeypatch):
    return _no_flock(monkeypatch)


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK], ids=["ENOSYS", "EOPNOTSUPP", "ENOLCK"])
def test_no_flock_falls_back_to_a_lease_file(tmp_path, monkeypatch, code, caplog):
    no_flock = _no_flock(monkeypatch, code)
    cache = tmp_path / "caches" / "0123abcd"
    lease_file = tmp_path / "caches" / "0123abcd.lease"
    assert not WriterLock.is_held(cache)
    with caplog.at_level(logging.INFO, logger="tcskd.store.registry"), WriterLock(cache) as lock:
        held = LeaseInfo.from_json(lease_file.read_bytes())
        host, node, pid = this_holder()
        assert (held.writer, held.host, held.node, held.pid) == (lock._lease.writer, host, node, pid)
        assert WriterLock.is_held(cache)
        err = _in_thread(lambda: WriterLock(cache).__enter__())
        assert isinstance(err, LockedError) and err.exit_code == 3
        assert str(err) == f"another process ({held.describe()}) is writing cache {cache}; try again when it has finished"
    assert no_flock and f"no flock on {cache}.lock" in caplog.text
    assert not lease_file.exists() and not WriterLock.is_held(cache)
    assert [p.name for p in lease_file.parent.iterdir()] == ["0123abcd.lock"]  # no temporary file left


def _hold(cache: str, ready) -> None:
    with WriterLock(Path(cache)):
        ready.set()
        time.sleep(60)


def test_no_flock_second_process_refused_dead_holder_stale_at_once(tmp_path, no_flock, caplog):
    """A forked process (the patched flock inherited) holds the lease; another process is refused; once the holder
    is SIGKILLed, the lease (far from expiry) is stale at once on this host."""
    cache = tmp_path / "0123abcd"
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_hold, args=(str(cache), ready))
    p.start()
    try:
        assert ready.wait(30)
        with pytest.raises(LockedError, match=rf"another process \(pid {p.pid} on host {socket.gethostname()}, lease"):
            WriterLock(cache).__enter__()
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        held = LeaseInfo.from_json(Path(f"{cache}.lease").read_bytes())
        assert held.pid == p.pid and held.expires > time.time() + 30
        with caplog.at_level(logging.INFO, logger="tcskd.store.registry"), WriterLock(cache) as lock:
            assert LeaseInfo.from_json(Path(f"{cache}.lease").read_bytes()).writer == lock._lease.writer
        assert f"taking over the lease of {cache} (its process {p.pid} on this host is gone)" in caplog.text
    finally:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(10)


def test_no_flock_lease_renewed_while_writing(tmp_path, no_flock, monkeypatch):
    monkeypatch.setenv("TCSKD_LEASE_SECONDS", "0.4")
    cache = tmp_path / "0123abcd"
    seen = []
    with WriterLock(cache) as lock:
        t_end = time.time() + 1.2
        while time.time() < t_end:
            held = LeaseInfo.from_json(Path(f"{cache}.lease").read_bytes())
            assert held.writer == lock._lease.writer and held.expires > time.time()
            seen.append(held.expires)
            time.sleep(0.05)
        assert isinstance(_in_thread(lambda: WriterLock(cache).__enter__()), LockedError)
    assert seen[-1] > seen[0] + 0.6  # renewed (every ttl/3) throughout, never expired


def test_no_flock_wait_takes_the_lease_when_released(tmp_path, no_flock, monkeypatch):
    monkeypatch.setenv("TCSKD_LEASE_SECONDS", "1")
    cache = tmp_path / "0123abcd"
    first = WriterLock(cache).__enter__()
    timer = threading.Timer(0.4, first.__exit__, args=(None,))
    timer.start()
    t0 = time.monotonic()
    with WriterLock(cache, wait=True) as second:
        assert time.monotonic() - t0 >= 0.4
        assert LeaseInfo.from_json(Path(f"{cache}.lease").read_bytes()).writer == second._lease.writer
    timer.join()


def test_no_flock_basis_writers_side_by_side(cache, no_flock):
    with BasisLock(cache, "a"):
        assert Path(f"{cache}.basis-a.lease").exists() and not Path(f"{cache}.lease").exists()
        _fit(cache, "b", dim=2)
        with pytest.raises(LockedError, match=rf"another process \(pid {os.getpid()} on host .*\) is writing basis 'a'"):
            _fit(cache, "a", dim=2)
    with WriterLock(cache):  # a cache writer's lease refuses basis writers
        with pytest.raises(LockedError, match=f"is writing cache {cache}; try again"):
            _fit(cache, "a", dim=2)
    _fit(cache, "a", dim=2)
    with open_store(cache) as s:
        assert s.bases() == ["a", "b"]


def _foreign(host: str = "elsewhere", node: str = "", pid: int = 2 ** 22 + 7, expires_in: float = 60.0) -> bytes:
    return LeaseInfo("f" * 32, host, node, pid, time.time() + expires_in, 60.0).to_json()


def test_other_host_judged_by_expiry_only(tmp_path, no_flock, caplog):
    cache = tmp_path / "0123abcd"
    lease_file = Path(f"{cache}.lease")
    lease_file.write_bytes(_foreign(expires_in=1.0))  # its pid names no process here: not a reason
    with pytest.raises(LockedError, match=r"another process \(pid 4194311 on host elsewhere, lease until"):
        WriterLock(cache).__enter__()
    assert WriterLock.is_held(cache)
    time.sleep(1.1)
    with caplog.at_level(logging.INFO, logger="tcskd.store.registry"), WriterLock(cache):
        pass
    assert f"taking over the lease of {cache} (expired)" in caplog.text


def test_holder_gone_only_on_this_host_and_node():
    p = mp.get_context("fork").Process(target=time.sleep, args=(0,))
    p.start()
    p.join()  # a pid that is gone (reaped) here
    host, node, pid = this_holder()
    assert holder_gone(host, node, p.pid)
    assert not holder_gone(host, node, pid)  # alive
    assert not holder_gone("elsewhere", node, p.pid)  # another host: its pid says nothing here
    assert not holder_gone(host, "another-boot:1", p.pid)  # same name, another boot or PID namespace
    assert LeaseInfo("w", "elsewhere", "", p.pid, time.time() + 60, 60).stale() is None
    assert LeaseInfo("w", host, node, p.pid, time.time() + 60, 60).stale() == f"its process {p.pid} on this host is gone"
    assert LeaseInfo("w", "elsewhere", "", pid, time.time() - 1, 60).stale() == "expired"


def test_no_flock_rivals_exactly_one_wins(tmp_path, no_flock):
    """8 writers ask at once for a free lease file, then 8 at once for an expired one: one wins each time."""
    cache = tmp_path / "0123abcd"
    path = LocalLeaseFile(f"{cache}.lease")
    for stage in ("free", "expired"):
        if stage == "expired":
            path.path.write_bytes(_foreign(expires_in=-1))
        leases = [Lease(cache, ttl=30, path=path) for _ in range(8)]
        assert_one_of_eight_wins(cache, leases)
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary or stale copies left


def test_no_flock_lost_lease_is_reported(tmp_path, no_flock, monkeypatch):
    monkeypatch.setenv("TCSKD_LEASE_SECONDS", "0.6")
    cache = tmp_path / "0123abcd"
    theirs = _foreign()
    with pytest.raises(LockedError, match=r"was taken over by pid 4194311 on host elsewhere.*tcskd cache verify"):
        with WriterLock(cache):
            Path(f"{cache}.lease").write_bytes(theirs)
            time.sleep(1.0)
    assert Path(f"{cache}.lease").read_bytes() == theirs


def test_flock_holder_respects_a_lease_of_a_host_without_flock(cache):
    """Hosts that share a file system may differ: one without flock holds the lease file; a host with flock must
    not write beside it."""
    Path(f"{cache}.lease").write_bytes(_foreign())
    with pytest.raises(LockedError, match=r"another process \(pid 4194311 on host elsewhere, lease until .*\) is "
                                          f"writing cache {cache}"):
        WriterLock(cache).__enter__()
    with pytest.raises(LockedError, match=f"is writing cache {cache}"):
        _fit(cache, "a", dim=2)
    assert WriterLock.is_held(cache)
    Path(f"{cache}.lease").unlink()
    with WriterLock(cache):
        pass


def test_other_errors_of_flock_are_not_hidden(tmp_path, monkeypatch):
    def flock(fd, op):
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(OSError) as e:
        WriterLock(tmp_path / "x").__enter__()
    assert e.value.errno == errno.EBADF and not Path(f"{tmp_path / 'x'}.lease").exists()


# -- many experiments on one cache at once (processes) ----------------------------------------------------

TIMING = TIMING_KEYS | {"run_dir"}


@pytest.fixture(scope="module")
def forks(tmp_path_factory):
    """The reliability suite's fork server: ``tcskd ARGS`` exactly as ``python -m tcskd`` runs it, in a fork of a
    process that has already imported tcskd; faults (pauses) are installed in the child."""
    import torch

    from reliability._forkserver import ForkServer

    server = ForkServer(tmp_path_factory.mktemp("forkserver"), torch.get_num_threads())
    yield server
    server.close()


def _wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [l for l in stderr.strip().splitlines() if l.startswith("tcskd: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _final(run: Path) -> dict:
    return {k: v for k, v in json.loads((run / "final.json").read_text()).items() if k not in TIMING}


@pytest.mark.slow
def test_three_bases_fitted_at_once_beside_a_training_run(tmp_path, forks, tiny_teacher):
    import shutil

    from conftest import make_npz
    from reliability._students import SPEC
    from tcskd.cache.build import CacheConfig, build_cache
    from tcskd.cache.verify import verify_cache

    data = make_npz(tmp_path / "d.npz", n=64, n_test=16, size=12)
    built = build_cache(CacheConfig(data=data, teacher=tiny_teacher, image_size=16, chunk_rows=16, batch_size=8,
                                    device="cpu", cache_root=str(tmp_path / "caches")))
    cache = Path(built.path)
    _fit(cache, "base", dim=8)
    alone = tmp_path / "alone" / cache.name
    shutil.copytree(cache, alone)

    fits = {"b1": ["--kind", "pca", "--dim", "6", "--coords"], "b2": ["--kind", "random", "--dim", "5", "--coords"],
            "b3": ["--kind", "identity", "--whiten"]}

    def basis_args(name: str, *extra: str) -> list[str]:
        return ["-q", "basis", "--cache", str(cache), "--name", name, "--device", "cpu", "--no-plot", *fits[name],
                *extra]

    def train_args(out: Path) -> list[str]:
        return ["-q", "train", "--cache", str(cache), "--basis", "base", "--student", SPEC, "--epochs", "2",
                "--batch-size", "8", "--device", "cpu", "--workers", "0", "--labels-per-class", "6", "--seed", "3",
                "--out", str(out)]

    # Each writer pauses with its basis written hidden, its lock held, just before publishing it.
    pause = {"domain": "call", "target": "tcskd.store.bases:publish_group", "n": 1, "action": "pause"}
    pids = {name: forks.spawn(basis_args(name), tmp_path / name, [pause]) for name in fits}
    for name in fits:
        _wait_for(tmp_path / name / "paused")
    with open_store(cache) as s:
        assert sorted(s.children("bases")) == sorted([*(f".tmp-{n}-{pids[n]}" for n in fits), "base"])
    assert verify_cache(cache).problems == []

    # a second writer of the same basis: refused in one line (exit 3), or waits with --wait
    again = forks.run(basis_args("b1"), tmp_path / "b1-again")
    assert again.code == 3
    assert _one_error_line(again.stderr) == (f"tcskd: error: another process (pid {pids['b1']}) is writing basis 'b1' "
                                             f"of cache {cache}; try again when it has finished")
    waiter = forks.spawn(basis_args("b1", "--wait"), tmp_path / "b1-wait")

    # a run reading the cache, paused where it lists the bases, then everything at once
    run = forks.spawn(train_args(tmp_path / "run"), tmp_path / "train",
                      [{"domain": "call", "target": "tcskd.store.backends:Store.bases", "n": 1, "action": "pause"}])
    _wait_for(tmp_path / "train" / "paused")
    time.sleep(0.3)
    assert forks.running(waiter), "the --wait writer did not wait"
    for out in ("train", *fits):
        (tmp_path / out / "release").write_text("")
    for name, pid in pids.items():
        res = forks.wait(pid, tmp_path / name)
        assert res.code == 0, res.stderr
    res = forks.wait(run, tmp_path / "train")
    assert res.code == 0, res.stderr
    res = forks.wait(waiter, tmp_path / "b1-wait")
    assert res.code == 0, res.stderr

    # each basis equals the one fitted alone; the run equals an undisturbed run
    for name, args in fits.items():
        cfg = {"kind": args[1], "dim": int(args[3]) if "--dim" in args else None, "coords": "--coords" in args,
               "whiten": "--whiten" in args}
        _fit(alone, name, **cfg)
        _assert_same_basis(_arrays(cache, name), _arrays(alone, name))
    quiet = forks.run(train_args(tmp_path / "quiet"), tmp_path / "train-quiet")
    assert quiet.code == 0, quiet.stderr
    assert _final(tmp_path / "run") == _final(tmp_path / "quiet")
    with open_store(cache) as s:
        assert s.children("bases") == ["b1", "b2", "b3", "base"]
    assert verify_cache(cache).problems == []


def test_basis_locks_on_an_object_store():
    """On an object store the locks are lease objects beside the cache (memory://: no conditional writes)."""
    import uuid

    from tcskd.store.paths import RemotePath, as_location

    cache = as_location(f"memory://locks-{uuid.uuid4().hex[:8]}/caches/0123abcd")
    with BasisLock(cache, "a"):
        assert RemotePath(f"{cache}.basis-a.lease").exists() and not RemotePath(f"{cache}.lease").exists()
        with BasisLock(cache, "b"):
            pass
        with pytest.raises(LockedError, match=rf"another process \(pid {os.getpid()} on host .*\) is writing basis 'a' "
                                              f"of cache {cache}; try again"):
            BasisLock(cache, "a").__enter__()
    assert not RemotePath(f"{cache}.basis-a.lease").exists()
    with WriterLock(cache):
        with pytest.raises(LockedError, match=f"is writing cache {cache}; try again"):
            BasisLock(cache, "a").__enter__()


def test_cache_parent_is_the_folder_every_rank_must_share(tmp_path, monkeypatch):
    from tcskd.store.paths import RemotePath
    from tcskd.store.registry import cache_parent

    monkeypatch.delenv("TCSKD_CACHE", raising=False)
    assert cache_parent("0123abcd") == Path("caches")
    assert cache_parent("0123abcd", str(tmp_path)) == tmp_path
    assert cache_parent(str(tmp_path / "c" / "0123abcd"), "elsewhere") == tmp_path / "c"
    assert cache_parent("rel/0123abcd") == Path("rel")
    assert str(cache_parent("s3://bucket/caches/0123abcd")) == "s3://bucket/caches"
    assert isinstance(cache_parent("s3://bucket/caches/0123abcd"), RemotePath)
