"""A pre-imported process that forks one child per ``tcskd`` command.

Starting ``python -m tcskd`` costs seconds of imports; a fork of a process that
has already imported tcskd, torch, zarr and h5py (and has started no thread)
costs milliseconds. Each child installs its faults (see _faults), runs the CLI
exactly as ``python -m tcskd ARGS`` would, with stdout/stderr going to files in
its own folder, and exits with the CLI's exit code, or dies by the injected
SIGKILL. Requests and replies are JSON lines on the server's stdin/stdout.

Client side: :class:`ForkServer` (``run`` = ``spawn`` + ``wait``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent


def _preload(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    import h5py  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import torch._dynamo  # noqa: F401  (the optimizers import it on first use)
    import yaml  # noqa: F401
    import zarr  # noqa: F401
    from PIL import Image  # noqa: F401
    from tqdm import auto  # noqa: F401

    import tcskd.cache.build  # noqa: F401
    import tcskd.cache.verify  # noqa: F401
    import tcskd.cli  # noqa: F401
    import tcskd.subspace.fit  # noqa: F401
    import tcskd.teachers  # noqa: F401
    import tcskd.train.evaluate  # noqa: F401
    import tcskd.train.loop  # noqa: F401
    try:
        import faiss  # noqa: F401
    except ImportError:
        pass


def _child(req: dict[str, Any]) -> None:
    out = req["out"]
    os.makedirs(out, exist_ok=True)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(os.path.join(out, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if req.get("cwd"):
        os.chdir(req["cwd"])
    os.environ.update(req.get("env") or {})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    code = 1
    try:
        from reliability import _faults

        _faults.install(req.get("faults") or [], out)
        from tcskd.cli import main

        main(req["args"], prog_name="tcskd", standalone_mode=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # what python -m tcskd would print for an uncaught error
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    _preload(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    reply = sys.stdout
    children: set[int] = set()
    finished: dict[int, int] = {}

    def send(obj: dict[str, Any]) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    send({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "spawn":
            pid = os.fork()
            if pid == 0:
                try:
                    _child(req)
                finally:
                    os._exit(70)
            children.add(pid)
            send({"pid": pid})
        elif op in ("wait", "poll"):
            pid = req["pid"]
            if pid in finished:
                send({"pid": pid, "code": finished.pop(pid) if op == "wait" else finished[pid]})
                continue
            deadline = time.monotonic() + (req.get("timeout", 120) if op == "wait" else 0)
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    children.discard(pid)
                    code = os.waitstatus_to_exitcode(status)
                    if op == "poll":
                        finished[pid] = code
                    send({"pid": pid, "code": code})
                    break
                if time.monotonic() >= deadline:
                    if op == "wait":
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                        children.discard(pid)
                        send({"pid": pid, "code": None, "timeout": True})
                    else:
                        send({"pid": pid, "code": None})
                    break
                time.sleep(0.01)
        else:
            send({"error": f"unknown op {op}"})
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass


@dataclass
class Result:
    code: int | None
    stdout: str
    stderr: str
    out: Path

    @property
    def killed(self) -> bool:
        return self.code == -signal.SIGKILL

    @property
    def fired(self) -> list | None:
        f = self.out / "fired"
        return json.loads(f.read_text()) if f.exists() else None

    def events(self, domain: str = "store") -> list[tuple[int, str]]:
        f = self.out / f"events-{domain}.jsonl"
        return [tuple(json.loads(x)) for x in f.read_text().splitlines()] if f.exists() else []


class ForkServer:
    """Client of the fork server: ``run(args, out, faults)`` runs ``tcskd ARGS`` in a fresh child."""

    def __init__(self, log_dir: Path, threads: int) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                   PYTHONUNBUFFERED="1")
        self._log = open(log_dir / "forkserver.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "reliability._forkserver", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, cwd=str(TESTS), env=env)
        ready = self._read()
        assert ready.get("ready"), ready

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died; see {self._log.name}")
        return json.loads(line)

    def _ask(self, req: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def spawn(self, args: list[str], out: Path, faults: list[dict[str, Any]] | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        out.mkdir(parents=True, exist_ok=True)
        return self._ask({"op": "spawn", "args": [str(a) for a in args], "out": str(out), "faults": faults or [],
                          "env": env or {}, "cwd": str(cwd) if cwd else None})["pid"]

    def wait(self, pid: int, out: Path, timeout: float = 120) -> Result:
        r = self._ask({"op": "wait", "pid": pid, "timeout": timeout})
        assert not r.get("timeout"), f"child {pid} timed out; output in {out}"
        return Result(r["code"], (out / "stdout").read_text(), (out / "stderr").read_text(), out)

    def running(self, pid: int) -> bool:
        return self._ask({"op": "poll", "pid": pid})["code"] is None

    def run(self, args: list[str], out: Path, faults: list[dict[str, Any]] | None = None,
            env: dict[str, str] | None = None, timeout: float = 120) -> Result:
        return self.wait(self.spawn(args, out, faults, env), out, timeout)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        self._log.close()


if __name__ == "__main__":
    serve()
