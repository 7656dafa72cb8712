"""torch.distributed, when the process was started by ``torchrun``; a no-op otherwise.

``torchrun --nproc-per-node N -m tcskd <stage> ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK; every stage calls :func:`init` and then uses the helpers below.
NCCL is the backend on GPUs, gloo on the CPU.

:func:`check_shared_root`: under torchrun every rank must see the cache root as one folder (a relative or
node-local root under a multi-node run is refused in one line on every rank, within seconds).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device | None = None) -> None:
    """Join the process group once (NCCL on CUDA, gloo otherwise)."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=_dt.timedelta(minutes=60))
    log.info("rank %d of %d joined (%s)", rank(), world(), backend)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (e.g. an error message or a path)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (float64 stays float64 under gloo and NCCL)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def device_for_rank(device: torch.device) -> torch.device:
    """Each rank takes its own GPU (LOCAL_RANK); the CPU is shared."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", local_rank())
    return device


def shutdown() -> None:
    global _CHECK_GROUP
    _CHECK_GROUP = None
    if active():
        dist.destroy_process_group()


# -- one cache root for every rank --------------------------------------------------------------

#: Seconds the ranks wait for each other in :func:`check_shared_root` before giving up.
CHECK_SECONDS = 30.0
#: The marker rank 0 writes into the root: ``.tcskd-root-<token>`` (hidden: no cache listing shows it).
MARKER_PREFIX = ".tcskd-root-"
_CHECK_GROUP: Any = None
_MAX_NAMED = 4


def multi_node() -> bool:
    """Whether the ranks span more than one machine (torchrun's WORLD_SIZE > LOCAL_WORLD_SIZE; a launcher that
    does not say LOCAL_WORLD_SIZE counts as several machines)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return world_size > int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) if world_size > 1 else False


def check_shared_root(root: object, timeout: float = CHECK_SECONDS) -> None:
    """TcskdError, the same one line on every rank, unless every rank sees the cache root ``root`` (a folder or an
    fsspec URL) as one and the same folder. A no-op outside torchrun; call it on every rank after :func:`init`.

    - A relative root under a multi-node run (:func:`multi_node`) is refused outright (each node would resolve
      it in its own working directory).
    - A local root: rank 0 creates it and writes a marker file with a random token into it; every rank reads the
      marker at its own resolved root; a rank that does not read the token (another folder, a node-local disk)
      is named in the error, with its host and resolved root.
    - URLs (object stores) are taken as shared; every rank must give the same one.

    The ranks exchange what they saw through a gloo group whose collectives give up after ``timeout`` seconds
    (a rank that never arrives is an error, not a hang).
    """
    if not launched():
        return
    if not active():
        raise RuntimeError("check_shared_root needs the process group: call tcskd.dist.init() first")
    from tcskd.errors import TcskdError
    from tcskd.store.paths import is_remote

    given = str(root)
    remote = is_remote(root)
    relative = not remote and not Path(given).is_absolute()
    resolved = given if remote else str(Path(given).resolve())
    me = {"rank": rank(), "host": socket.gethostname(), "given": given, "resolved": resolved, "remote": remote,
          "relative": relative, "token": None, "error": None}
    marker: Path | None = None
    if rank() == 0 and not remote and not (relative and multi_node()):
        token = uuid.uuid4().hex
        marker = Path(resolved) / f"{MARKER_PREFIX}{token}"
        try:
            Path(resolved).mkdir(parents=True, exist_ok=True)
            marker.write_text(token)
            me["token"] = token
        except OSError as e:
            marker = None
            me["error"] = f"{type(e).__name__}: {e.strerror or e}"
    try:
        reports = _gather(me, timeout)
        problem = _root_problem(reports)
        if problem is None and not remote:
            token = reports[0]["token"]
            try:
                seen = (Path(resolved) / f"{MARKER_PREFIX}{token}").read_text().strip()
            except OSError:
                seen = None
            seen_by = _gather(seen, timeout)
            problem = _marker_problem(reports, [s == token for s in seen_by])
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
    if problem is not None:
        raise TcskdError(problem)
    log.debug("every rank sees the cache root %s", resolved)


_HINT = ("under a multi-node torchrun every node must see the same folder; give an absolute path on a shared "
         "filesystem or an fsspec URL")


def _root_problem(reports: list[dict[str, Any]]) -> str | None:
    """What the ranks' reports say is wrong before any marker is read (the same on every rank)."""
    relative = [r for r in reports if r["relative"]]
    if relative and multi_node():
        return f"the cache root '{relative[0]['given']}' is relative: {_HINT}"
    if any(r["remote"] for r in reports):
        givens = sorted({r["given"] for r in reports})
        if len(givens) > 1:
            return f"the ranks give different cache roots ({', '.join(repr(g) for g in givens[:_MAX_NAMED])}): {_HINT}"
        return None
    if reports[0]["error"]:
        return f"rank 0 cannot write into the cache root '{reports[0]['resolved']}' ({reports[0]['error']})"
    return None


def _marker_problem(reports: list[dict[str, Any]], saw: list[bool]) -> str | None:
    bad = [r for r, ok in zip(reports, saw) if not ok]
    if not bad:
        return None
    named = ", ".join(f"{r['rank']} (host {r['host']}: {r['resolved']})" for r in bad[:_MAX_NAMED])
    more = f" and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
    head = reports[0]
    return (f"the cache root '{head['resolved']}' of rank 0 (host {head['host']}) is not the folder of every rank: "
            f"rank{'s' if len(bad) > 1 else ''} {named}{more} do{'' if len(bad) > 1 else 'es'} not see the marker "
            f"rank 0 wrote into it; {_HINT}")


def _gather(obj: object, timeout: float) -> list[Any]:
    """Every rank's ``obj`` (by rank) through a gloo group that gives up after ``timeout`` seconds."""
    from tcskd.errors import TcskdError

    global _CHECK_GROUP
    try:
        if _CHECK_GROUP is None:
            _CHECK_GROUP = dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=timeout))
        out: list[Any] = [None] * world()
        dist.all_gather_object(out, obj, group=_CHECK_GROUP)
        return out
    except (RuntimeError, TimeoutError) as e:  # gloo's timeout (DistBackendError is a RuntimeError)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TcskdError(f"rank {rank()} (host {socket.gethostname()}) waited {timeout:g} s for the other ranks "
                         f"to check the cache root; not every rank arrived ({first[:160]})") from None
