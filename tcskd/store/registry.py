"""Where caches live, how they are named, and how writers exclude each other.

A cache's key is the first 16 hex digits of the sha256 of its identity
(canonical JSON): the same inputs always map to the same directory, so a
repeated command is a cache hit, and a different teacher, weights,
preprocessing, dataset, split, view count or dtype never collides.

One writer per cache: a ``flock`` beside a local cache, a renewed lease object
beside a cache on an object store (:class:`WriterLock`, :class:`Lease`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tcskd.store.backends import detect_format, open_store
from tcskd.store.manifest import Manifest
from tcskd.store.paths import PreconditionFailed, RemotePath, as_location, is_remote
from tcskd.errors import LockedError, StoreError, TcskdError

log = logging.getLogger(__name__)


def default_cache_root() -> "Path | RemotePath":
    """$TCSKD_CACHE (a folder or an fsspec URL), else ./caches."""
    return as_location(os.environ.get("TCSKD_CACHE") or "caches")


def cache_root_of(cache_root: "str | Path | RemotePath | None") -> "Path | RemotePath":
    return as_location(cache_root) if cache_root else default_cache_root()


def cache_key(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_cache(key_or_path: "str | Path | RemotePath",
                  cache_root: "str | Path | RemotePath | None" = None) -> "Path | RemotePath":
    """A cache directory from a path (or URL) or a key under ``cache_root``; StoreError if none."""
    p = as_location(key_or_path)
    if detect_format(p) is not None:
        return p
    root = cache_root_of(cache_root)
    q = root / str(key_or_path)
    if detect_format(q) is not None:
        return q
    # A unique key prefix is enough, like a git SHA.
    if root.is_dir() and "/" not in str(key_or_path):
        hits = [d for d in root.iterdir() if d.name.startswith(str(key_or_path)) and detect_format(d)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise StoreError(f"cache key prefix '{key_or_path}' is ambiguous under {root}")
    raise StoreError(f"no cache '{key_or_path}' (not a cache directory, nor a key under {root})")


def list_caches(cache_root: "str | Path | RemotePath | None" = None) -> list[dict[str, Any]]:
    """One summary row per cache under ``cache_root`` (damaged ones say so)."""
    root = cache_root_of(cache_root)
    rows = []
    if not root.is_dir():
        return rows
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not d.is_dir() or detect_format(d) is None:
            continue
        try:
            with open_store(d) as s:
                m = Manifest.read(s)
                done = s.chunk_done() if "chunk_done" in s else None
                rows.append({
                    "key": d.name, "data": m.data_spec, "split": m.split,
                    "teacher": m.teacher_spec, "rows": m.n_rows, "dim": m.dim,
                    "views": m.views, "format": s.format, "size_bytes": s.size_bytes(),
                    "complete": bool(done is not None and done.all() and m.complete),  # as integrity's "done"
                    "chunks_done": f"{int(done.sum()) if done is not None else 0}/{len(done) if done is not None else '?'}",
                    "bases": s.bases(), "path": str(d),
                })
        except StoreError as e:
            rows.append({"key": d.name, "data": None, "split": None, "teacher": None, "rows": None,
                         "dim": None, "views": None, "format": detect_format(d), "size_bytes": 0,
                         "complete": False, "chunks_done": "?", "bases": [], "path": str(d),
                         "error": str(e)})
    return rows


# -- writers' exclusion: flock on a local disk, a lease on an object store ----------------------

LEASE_ENV = "TCSKD_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 60.0


def lease_seconds() -> float:
    """The lease's time to live: ``$TCSKD_LEASE_SECONDS``, else 60 s."""
    env = os.environ.get(LEASE_ENV)
    if not env:
        return DEFAULT_LEASE_SECONDS
    try:
        value = float(env)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise TcskdError(f"{LEASE_ENV} must be a number of seconds > 0, not '{env}'")
    return value


def _node_id() -> str:
    """This machine's boot and PID namespace: two processes with the same node id see each other's
    pids (a container with the host's hostname but its own PID namespace has another node id)."""
    parts = []
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        pass
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return ":".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class LeaseInfo:
    """The content of a ``<cache>.lease`` object (JSON)."""

    writer: str
    """A random id of the holding WriterLock (uuid4 hex)."""
    host: str
    node: str
    """Boot id and PID namespace of the holder (see _node_id)."""
    pid: int
    expires: float
    """Unix time after which the lease is void unless renewed (the holder's clock)."""
    ttl: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "LeaseInfo | None":
        try:
            d = json.loads(data)
            return cls(writer=str(d["writer"]), host=str(d["host"]), node=str(d.get("node", "")),
                       pid=int(d["pid"]), expires=float(d["expires"]), ttl=float(d["ttl"]))
        except (ValueError, KeyError, TypeError):
            return None

    def stale(self, now: float | None = None) -> str | None:
        """Why the lease no longer protects anything (None: it is live)."""
        if self.expires < (time.time() if now is None else now):
            return "expired"
        if self.host == socket.gethostname() and self.node == _node_id() and not _pid_alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        return None

    def describe(self) -> str:
        until = time.strftime("%H:%M:%S UTC", time.gmtime(self.expires))
        return f"pid {self.pid} on host {self.host}, lease until {until}"


class Lease:
    """The writer lease of a cache on an object store: the object ``<cache>.lease`` beside it.

    Taken atomically where the store has conditional writes (S3: ``If-None-Match: *`` to create,
    ``If-Match: <ETag>`` to take over an expired lease or renew one's own), then read back and
    compared (a store that ignored the condition shows another writer's id). Renewed every ttl/3
    by a background thread; deleted on release. A lease is stale once expired, or at once when
    its holder ran on this host and its process is gone (a rerun after SIGKILL need not wait).
    """

    def __init__(self, cache_dir: RemotePath, ttl: float | None = None) -> None:
        self.cache = cache_dir
        self.path = RemotePath(str(cache_dir).rstrip("/") + ".lease")
        self.ttl = lease_seconds() if ttl is None else float(ttl)
        self.writer = uuid.uuid4().hex
        self.lost: LeaseInfo | None = None
        self._lost = False
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> tuple[LeaseInfo | None, str | None, bool]:
        """(lease or None if unreadable, its version tag, whether an object exists)."""
        try:
            data, tag = self.path.read_versioned()
        except FileNotFoundError:
            return None, None, False
        return LeaseInfo.from_json(data), tag, True

    def _mine(self) -> bytes:
        return LeaseInfo(self.writer, socket.gethostname(), _node_id(), os.getpid(),
                         time.time() + self.ttl, self.ttl).to_json()

    def try_acquire(self) -> LeaseInfo | None:
        """Take the lease if it is free or stale: None when taken, else the live holder's lease."""
        for _ in range(8):  # each turn ends in a decision or a lost race (then look again)
            try:
                self._tag = self.path.create_exclusive(self._mine())
                return self._confirm()
            except FileExistsError:
                pass
            held, tag, exists = self.read()
            if not exists:
                continue  # released between our two requests
            why = "unreadable" if held is None else held.stale()
            if why is None:
                return held
            log.info("taking over the lease of %s (%s)", self.cache, why)
            try:
                self._tag = self.path.replace_if(self._mine(), tag)
            except PreconditionFailed:
                continue
            return self._confirm()
        held, _, _ = self.read()
        if held is None:
            raise LockedError(f"could not take the writer lease of cache {self.cache}; try again")
        return held

    def _confirm(self) -> LeaseInfo | None:
        held, tag, _ = self.read()
        if held is not None and held.writer == self.writer:
            self._tag = tag or self._tag
            self._start_renewal()
            return None
        return held or LeaseInfo("?", "?", "", 0, time.time() + self.ttl, self.ttl)

    def acquire(self, wait: bool = False) -> None:
        """Take the lease; LockedError while another writer holds it (``wait``: poll until free)."""
        said = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                log.debug("holding the lease %s (ttl %.0f s)", self.path, self.ttl)
                return
            if not wait:
                raise LockedError(f"another process ({holder.describe()}) is writing cache {self.cache}; "
                                  f"try again when it has finished")
            if not said:
                log.info("waiting for the writer of %s (%s)", self.cache, holder.describe())
                said = True
            time.sleep(max(0.05, min(self.ttl / 6, 2.0, holder.expires - time.time() + 0.05)))

    def _start_renewal(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.cache.name}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except PreconditionFailed:
                held, _, _ = self.read()
                self._lost, self.lost = True, held
                log.error("lost the writer lease of %s to %s", self.cache,
                          held.describe() if held else "another writer")
                return
            except (TcskdError, OSError) as e:
                log.warning("could not renew the lease of %s (%s); trying again", self.cache, e)

    def renew(self) -> None:
        """Push the expiry ttl seconds ahead; PreconditionFailed if another writer took the lease."""
        if self._tag is None:  # no conditional writes: check it is still ours, then write (a small race)
            held, _, _ = self.read()
            if held is None or held.writer != self.writer:
                raise PreconditionFailed(f"{self.path} changed")
        self._tag = self.path.replace_if(self._mine(), self._tag)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._lost:
            return
        try:
            held, _, _ = self.read()
            if held is not None and held.writer == self.writer:
                self.path.delete_object()
        except (TcskdError, OSError) as e:  # it expires by itself
            log.warning("could not delete the lease of %s (%s)", self.cache, e)


class WriterLock:
    """One writer per cache: an exclusive, non-blocking ``flock`` on ``<dir>.lock`` beside a local
    cache; a :class:`Lease` (``<dir>.lease``) beside a cache on an object store.

    The kernel drops a flock when the holder dies (even by SIGKILL), so a crashed
    writer never leaves a stale lock behind; a crashed writer's lease expires
    after ``$TCSKD_LEASE_SECONDS`` (at once for a rerun on the same host).
    """

    def __init__(self, cache_dir: "Path | RemotePath", wait: bool = False) -> None:
        self.remote = is_remote(cache_dir)
        self.cache = cache_dir
        self.path = Path(str(cache_dir).rstrip("/") + ".lock")
        self.wait = wait
        self._fd: int | None = None
        self._lease: Lease | None = None

    def __enter__(self) -> "WriterLock":
        if self.remote:
            lease = Lease(self.cache)
            lease.acquire(wait=self.wait)
            self._lease = lease
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                holder = ""
                try:
                    holder = f" (pid {self.path.read_text().strip()})"
                except OSError:
                    pass
                raise LockedError(f"another process{holder} is writing cache {self.path.with_suffix('')}; "
                                  f"try again when it has finished") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, exc_type: object = None, *exc: object) -> None:
        if self._lease is not None:
            lease, self._lease = self._lease, None
            lease.release()
            if lease._lost and exc_type is None:
                who = lease.lost.describe() if lease.lost else "another writer"
                raise LockedError(f"the writer lease of cache {self.cache} was taken over by {who} while this "
                                  f"process wrote (not renewed within {lease.ttl:g} s); check it with "
                                  f"tcskd cache verify")
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def close_in_child(self) -> None:
        """In a forked child (a DataLoader worker): close its copy of the lock's descriptor, without unlocking,
        so that the lock goes when its holder goes (a killed writer's workers do not keep it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def is_held(cache_dir: "Path | RemotePath") -> bool:
        """Whether a writer holds the cache now (a live lease, for a cache on an object store)."""
        if is_remote(cache_dir):
            held, _, exists = Lease(cache_dir, ttl=1).read()
            return exists and held is not None and held.stale() is None
        path = Path(str(cache_dir).rstrip("/") + ".lock")
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False
