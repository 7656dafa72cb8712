"""A cache root that is not one folder for every node of a multi-node torchrun is refused on every rank.

Two torchrun "nodes" run on this machine (``--nnodes 2``, one process each, c10d rendezvous on 127.0.0.1) in
different working directories; the driver joins the process group as the stages do (``tcskd.dist.init``) and
calls ``tcskd.dist.check_shared_root`` on each root it is given, printing ``ok ROOT`` or the one-line error.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _s3 import free_port

pytestmark = pytest.mark.slow

DRIVER = """
import sys, time
import torch
from tcskd import dist
from tcskd.errors import TcskdError
from tcskd.store.paths import as_location

timeout, roots = float(sys.argv[1]), sys.argv[2:]
dist.init(torch.device("cpu"))
if roots == ["skip"]:  # a rank that never reaches the check
    time.sleep(3 * timeout)
    sys.exit(0)
for root in roots:
    t = time.monotonic()
    try:
        dist.check_shared_root(as_location(root), timeout=timeout)
    except TcskdError as e:
        print(f"tcskd: error: {e}", file=sys.stderr, flush=True)
        print(f"check-seconds {time.monotonic() - t:.2f}", flush=True)
        sys.exit(2)
    print(f"ok {root}", flush=True)
"""


def _two_nodes(tmp_path: Path, roots: dict[int, list[str]], timeout: float = 20.0, nodes: int = 2,
               command: list[str] | None = None) -> list[dict]:
    """Start both nodes (node R in tmp_path/nodeR) and return, for the first ``nodes`` of them, the exit code,
    output and seconds; the others are killed (with their workers) once those have finished. ``command``: what each
    node runs instead of the driver (e.g. ``-m tcskd basis ...``)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                           os.environ.get("PYTHONPATH", "")]))
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", f"tcskd-{port}", "--max-restarts", "0",
               *(command or [str(driver), str(timeout), *roots[node]])]
        procs.append((subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, start_new_session=True), time.monotonic()))
    out = []
    try:
        for p, t0 in procs[:nodes]:
            stdout, stderr = p.communicate(timeout=240)
            out.append({"code": p.returncode, "stdout": stdout, "stderr": stderr, "seconds": time.monotonic() - t0,
                        "errors": [l for l in stderr.splitlines() if l.startswith("tcskd: error:")],
                        "check": [float(x) for x in re.findall(r"check-seconds ([\d.]+)", stdout)]})
    finally:
        for p, _ in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # this torchrun and its worker (their own session)
            p.communicate()
    return out


def test_relative_root_refused_on_every_node(tmp_path):
    res = _two_nodes(tmp_path, {0: ["caches"], 1: ["caches"]})
    for r in res:
        assert r["code"] != 0, r["stderr"]
        assert r["errors"] == ["tcskd: error: the cache root 'caches' is relative: under a multi-node torchrun every "
                               "node must see the same folder; give an absolute path on a shared filesystem or an "
                               "fsspec URL"], r["stderr"]
        assert r["check"] and r["check"][0] < 5 and r["seconds"] < 60, (r["check"], r["seconds"])
    assert not (tmp_path / "node0" / "caches").exists() and not (tmp_path / "node1" / "caches").exists()


def test_same_folder_passes_then_different_folders_refused(tmp_path):
    shared = tmp_path / "shared" / "caches"
    own = {n: tmp_path / f"node{n}" / "caches" for n in (0, 1)}
    res = _two_nodes(tmp_path, {n: [str(shared), str(own[n])] for n in (0, 1)})
    assert not list(shared.iterdir()), "the marker was left behind"
    lines = []
    for r in res:
        assert f"ok {shared}" in r["stdout"].splitlines(), r["stderr"]
        assert r["code"] != 0 and len(r["errors"]) == 1, r["stderr"]
        assert r["check"] and r["check"][0] < 5 and r["seconds"] < 60, (r["check"], r["seconds"])
        lines.append(r["errors"][0])
    assert lines[0] == lines[1]  # the same line on every rank
    m = re.fullmatch(r"tcskd: error: the cache root '(.+)' of rank 0 \(host [^)]+\) is not the folder of every rank: "
                     r"rank 1 \(host [^:]+: (.+)\) does not see the marker rank 0 wrote into it; under a multi-node "
                     r"torchrun every node must see the same folder; give an absolute path on a shared filesystem or "
                     r"an fsspec URL", lines[0])
    assert m, lines[0]
    assert {m.group(1), m.group(2)} == {str(own[0]), str(own[1])}
    assert all(not list(d.iterdir()) for d in own.values() if d.exists()), "the marker was left behind"


def test_a_rank_that_never_arrives_is_an_error_not_a_hang(tmp_path):
    res = _two_nodes(tmp_path, {0: [str(tmp_path / "shared")], 1: ["skip"]}, timeout=3.0, nodes=1)
    r = res[0]
    assert r["code"] != 0 and len(r["errors"]) == 1, r["stderr"]
    assert re.match(r"tcskd: error: rank [01] \(host [^)]+\) waited 3 s for the other ranks to check the cache root; "
                    r"not every rank arrived", r["errors"][0]), r["errors"]
    assert r["check"] and 3 <= r["check"][0] < 15, r["stdout"]


def test_tcskd_basis_checks_its_cache_root(tmp_path):
    """The stage itself: `torchrun -m tcskd basis` with a relative cache root fails on both nodes in one line."""
    res = _two_nodes(tmp_path, {}, command=["-m", "tcskd", "basis", "--cache", "0123abcd", "--cache-root", "caches",
                                            "--device", "cpu"])
    for r in res:
        assert r["code"] != 0
        assert r["errors"] == ["tcskd: error: the cache root 'caches' is relative: under a multi-node torchrun every "
                               "node must see the same folder; give an absolute path on a shared filesystem or an "
                               "fsspec URL"], r["stderr"]
        assert r["seconds"] < 60
