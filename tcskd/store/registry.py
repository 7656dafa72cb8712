"""Where caches live, how they are named, and how writers exclude each other.

A cache's key is the first 16 hex digits of the sha256 of its identity
(canonical JSON): the same inputs always map to the same directory, so a
repeated command is a cache hit, and a different teacher, weights,
preprocessing, dataset, split, view count or dtype never collides.

One writer per cache: a ``flock`` beside a local cache, a renewed lease object
beside a cache on an object store (:class:`WriterLock`, :class:`Lease`), or a
lease file beside a local cache where the file system has no ``flock`` (some
network file systems). One writer per basis (:class:`BasisLock`): writers of
different bases of one Zarr cache run side by side; readers never lock.
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


def cache_parent(key_or_path: "str | Path | RemotePath",
                 cache_root: "str | Path | RemotePath | None" = None) -> "Path | RemotePath":
    """The folder that holds the cache ``key_or_path`` names, without looking: the parent of a path or URL (anything
    with a '/'), else the cache root where a key is looked up. What every rank of a torchrun must share
    (:func:`tcskd.dist.check_shared_root`)."""
    text = str(key_or_path)
    if isinstance(key_or_path, (Path, RemotePath)) or "/" in text:
        return as_location(key_or_path).parent
    return cache_root_of(cache_root)


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
#: What ``fcntl.flock`` raises on a file system without flock (some network file systems): a lease file then.
NO_FLOCK_ERRNOS = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK})
#: What ``link(2)`` raises on a file system without hard links: the lease file is then created with O_EXCL.
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK})


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


def this_holder() -> tuple[str, str, int]:
    """(host, node, pid) of this process, as a lock or lease records its holder (see :func:`holder_gone`)."""
    return socket.gethostname(), _node_id(), os.getpid()


def holder_gone(host: str, node: str, pid: int) -> bool:
    """Whether the holder recorded as (``host``, ``node``, ``pid``) is certainly gone.

    Only a holder on this host (same hostname) and node (same boot id and PID namespace, :func:`_node_id`) is
    looked up by its pid: it is gone at once when its process is. A pid recorded on another host, or before a
    reboot, may name an unrelated process here: such a holder counts as alive, and only the expiry of its lease
    ends its claim.
    """
    return host == socket.gethostname() and node == _node_id() and not _pid_alive(int(pid))


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
        """Why the lease no longer protects anything (None: it is live): expired, or its holder ran on this
        host and node and its process is gone (:func:`holder_gone`); another host's holder is never judged by
        its pid."""
        if self.expires < (time.time() if now is None else now):
            return "expired"
        if holder_gone(self.host, self.node, self.pid):
            return f"its process {self.pid} on this host is gone"
        return None

    def describe(self) -> str:
        until = time.strftime("%H:%M:%S UTC", time.gmtime(self.expires))
        return f"pid {self.pid} on host {self.host}, lease until {until}"


def _tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


class LocalLeaseFile:
    """The lease object of :class:`Lease` as a file on a local or network file system without ``flock``.

    The object store's conditional writes, with the file system's atomic operations:

    - create: the content is written whole to a temporary file, then ``link(2)``-ed to the lease's name, which
      fails if the name exists (an O_EXCL that NFS honours; a retried link that had succeeded is recognised by
      the temporary file's link count). Where hard links are not supported: ``O_EXCL`` create, then write (a
      reader meanwhile sees a short file and reads again).
    - renew (the holder): compare with the version it wrote, then ``rename(2)`` the new content over it.
    - take over (a stale lease): ``rename(2)`` it away first (one of two rivals gets it), check that it is the
      version judged stale (else put it back: a rival was first), then create as above.

    The version tag is a hash of the content (which names the writer and its expiry).
    """

    conditional_writes = True

    def __init__(self, path: "Path | str") -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def read_versioned(self) -> tuple[bytes, str]:
        """(bytes, version tag); FileNotFoundError if there is no lease file."""
        deadline = time.monotonic() + 0.5
        while True:
            data = self.path.read_bytes()
            if LeaseInfo.from_json(data) is not None or time.monotonic() > deadline:
                return data, _tag(data)
            time.sleep(0.02)  # an O_EXCL creation still being written

    def _write_tmp(self, data: bytes) -> Path:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp")
        _write_new(tmp, data)
        return tmp

    def create_exclusive(self, data: bytes) -> str:
        """Create the lease file with ``data`` only if none exists; FileExistsError otherwise."""
        self._create(self.path, data)
        return _tag(data)

    def _create(self, path: Path, data: bytes) -> None:
        """Create ``path`` holding ``data`` only if it does not exist (link of a whole temporary file, else
        O_EXCL); FileExistsError otherwise."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._write_tmp(data)
        try:
            try:
                os.link(tmp, path)
            except FileExistsError:
                if os.stat(tmp).st_nlink != 2:
                    raise
            except OSError as e:
                if e.errno not in _NO_LINK_ERRNOS:
                    raise
                _write_new(path, data)
        finally:
            tmp.unlink(missing_ok=True)

    def renew(self, data: bytes, tag: str) -> str:
        """Replace one's own lease (version ``tag``) by ``data``; PreconditionFailed if it changed."""
        try:
            _, now = self.read_versioned()
        except FileNotFoundError:
            raise PreconditionFailed(f"{self.path} is gone") from None
        if now != tag:
            raise PreconditionFailed(f"{self.path} changed")
        os.replace(self._write_tmp(data), self.path)
        return _tag(data)

    def take_over(self, data: bytes, tag: str | None) -> str:
        """Replace the stale lease of version ``tag`` by ``data``; PreconditionFailed if another process was
        first (the lease is gone, changed, or another rival is taking it over).

        Rivals for one stale version first create a marker named by that version (exclusively: one of them
        gets it); its holder checks that the lease is still that version and replaces it in one rename, so
        the live file is never moved away (a rival could otherwise create a lease of its own meanwhile)."""
        marker = self.path.with_name(f".{self.path.name}.takeover-{tag}")
        try:
            if time.time() - os.stat(marker).st_mtime > 60:  # left by a rival that died while taking over
                marker.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        try:
            self._create(marker, b"")
        except FileExistsError:
            raise PreconditionFailed(f"{self.path} is being taken over by another process") from None
        try:
            return self.renew(data, tag)  # still the stale version: replaced in one rename
        finally:
            marker.unlink(missing_ok=True)

    def delete_object(self) -> None:
        self.path.unlink(missing_ok=True)


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (O_EXCL) holding ``data``, synced to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


class Lease:
    """The writer lease of a cache on an object store: the object ``<cache>.lease`` beside it (or a
    :class:`LocalLeaseFile` where a local file system has no flock).

    Taken atomically where the store has conditional writes (S3: ``If-None-Match: *`` to create,
    ``If-Match: <ETag>`` to take over an expired lease or renew one's own), then read back and
    compared (a store that ignored the condition shows another writer's id). Renewed every ttl/3
    by a background thread; deleted on release. A lease is stale once expired, or at once when
    its holder ran on this host and its process is gone (a rerun after SIGKILL need not wait);
    a holder on another host is judged by the expiry alone (:func:`holder_gone`).

    ``path``: the lease object (default ``<cache_dir>.lease``); ``what``: what it guards, for messages
    (default ``cache <cache_dir>``).
    """

    def __init__(self, cache_dir: "RemotePath | Path", ttl: float | None = None, *,
                 path: "RemotePath | LocalLeaseFile | None" = None, what: str | None = None) -> None:
        self.cache = cache_dir
        self.path = path if path is not None else RemotePath(str(cache_dir).rstrip("/") + ".lease")
        self.what = what or f"cache {cache_dir}"
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

    def live(self) -> LeaseInfo | None:
        """The holder's lease when a live one exists (not stale, readable), else None."""
        held, _, exists = self.read()
        return held if exists and held is not None and held.stale() is None else None

    def _mine(self) -> bytes:
        host, node, pid = this_holder()
        return LeaseInfo(self.writer, host, node, pid, time.time() + self.ttl, self.ttl).to_json()

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
                if isinstance(self.path, LocalLeaseFile):
                    self._tag = self.path.take_over(self._mine(), tag)
                else:
                    self._tag = self.path.replace_if(self._mine(), tag)
            except PreconditionFailed:
                continue
            return self._confirm()
        held, _, _ = self.read()
        if held is None:
            raise LockedError(f"could not take the writer lease of {self.what}; try again")
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
                raise LockedError(f"another process ({holder.describe()}) is writing {self.what}; "
                                  f"try again when it has finished")
            if not said:
                log.info("waiting for the writer of %s (%s)", self.what, holder.describe())
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
                log.error("lost the writer lease of %s to %s", self.what,
                          held.describe() if held else "another writer")
                return
            except (TcskdError, OSError) as e:
                log.warning("could not renew the lease of %s (%s); trying again", self.what, e)

    def renew(self) -> None:
        """Push the expiry ttl seconds ahead; PreconditionFailed if another writer took the lease."""
        if isinstance(self.path, LocalLeaseFile):
            self._tag = self.path.renew(self._mine(), self._tag)
            return
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
            log.warning("could not delete the lease of %s (%s)", self.what, e)


class _Lock:
    """One lock named by ``stem``: a ``flock`` on the file ``<stem>.lock``, exclusive or ``shared``; a
    :class:`Lease` on ``<stem>.lease`` on an object store, or on a local file system whose ``flock`` fails with
    :data:`NO_FLOCK_ERRNOS`. A shared hold has no lease form: there it checks that no live exclusive lease
    exists (and waits for none with ``wait``), and holds nothing.

    A flock holder also respects a live ``<stem>.lease`` (a writer on a host where the same file system has
    no flock).
    """

    def __init__(self, stem: "Path | RemotePath", what: str, wait: bool = False, shared: bool = False) -> None:
        self.remote = is_remote(stem)
        self.stem = stem
        self.what = what
        self.wait = wait
        self.shared = shared
        self.path = Path(str(stem).rstrip("/") + ".lock") if not self.remote else None
        self._fd: int | None = None
        self._lease: Lease | None = None

    def lease(self, ttl: float | None = None) -> Lease:
        """The lease of this lock (not taken)."""
        where = str(self.stem).rstrip("/") + ".lease"
        path = RemotePath(where) if self.remote else LocalLeaseFile(where)
        return Lease(self.stem, ttl, path=path, what=self.what)

    def __enter__(self) -> "_Lock":
        if self.remote:
            self._enter_lease()
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        said = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | (0 if self.wait else fcntl.LOCK_NB))
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise LockedError(f"another process{self._flock_holder()} is writing {self.what}; "
                                      f"try again when it has finished") from None
                if e.errno in NO_FLOCK_ERRNOS:
                    log.info("no flock on %s (%s): using the lease file %s.lease", self.path,
                             errno.errorcode.get(e.errno, e.errno), self.stem)
                    self._enter_lease()
                    return self
                raise
            foreign = self.lease(ttl=1).live()  # a writer where this file system has no flock
            if foreign is None:
                break
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            said = self._wait_for(foreign, said)
            time.sleep(max(0.05, min(2.0, foreign.expires - time.time() + 0.05)))
        if not self.shared:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def _wait_for(self, holder: LeaseInfo, said: bool) -> bool:
        """Before sleeping on a live lease ``holder``: LockedError (one line) without ``wait``, else the
        "waiting" line once; returns whether it has been said."""
        if not self.wait:
            raise LockedError(f"another process ({holder.describe()}) is writing {self.what}; "
                              f"try again when it has finished")
        if not said:
            log.info("waiting for the writer of %s (%s)", self.what, holder.describe())
        return True

    def _flock_holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid else ""

    def _enter_lease(self) -> None:
        lease = self.lease()
        if not self.shared:
            lease.acquire(wait=self.wait)
            self._lease = lease
            return
        said = False
        while (holder := lease.live()) is not None:
            said = self._wait_for(holder, said)
            time.sleep(max(0.05, min(lease.ttl / 6, 2.0, holder.expires - time.time() + 0.05)))

    def __exit__(self, exc_type: object = None, *exc: object) -> None:
        if self._lease is not None:
            lease, self._lease = self._lease, None
            lease.release()
            if lease._lost and exc_type is None:
                who = lease.lost.describe() if lease.lost else "another writer"
                raise LockedError(f"the writer lease of {self.what} was taken over by {who} while this "
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

    def held_by_another(self) -> bool:
        """Whether a writer holds this lock now (a probe: takes nothing)."""
        if self.lease(ttl=1).live() is not None:
            return True
        if self.remote or not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            return e.errno not in NO_FLOCK_ERRNOS
        finally:
            os.close(fd)
        return False


class WriterLock(_Lock):
    """One writer per cache: an exclusive, non-blocking ``flock`` on ``<dir>.lock`` beside a local
    cache; a :class:`Lease` (``<dir>.lease``) beside a cache on an object store, or beside a local cache
    whose file system has no flock (``flock`` fails with ENOSYS, EOPNOTSUPP or ENOLCK).

    The kernel drops a flock when the holder dies (even by SIGKILL), so a crashed
    writer never leaves a stale lock behind; a crashed writer's lease expires
    after ``$TCSKD_LEASE_SECONDS`` (at once for a rerun on the same host).
    """

    def __init__(self, cache_dir: "Path | RemotePath", wait: bool = False) -> None:
        super().__init__(cache_dir, f"cache {cache_dir}", wait)
        self.cache = cache_dir

    @staticmethod
    def is_held(cache_dir: "Path | RemotePath") -> bool:
        """Whether a writer holds the cache now (a live lease, for a cache on an object store)."""
        return _Lock(cache_dir, f"cache {cache_dir}").held_by_another()


def basis_lock_stem(cache_dir: "Path | RemotePath", name: str, fmt: str = "zarr") -> "Path | RemotePath":
    """Where the lock of basis ``name`` of ``cache_dir`` lives (``<cache>.basis-<name>.lock`` or ``.lease``,
    beside the cache, so no reader of the cache sees it); an HDF5 cache has one lock for all its bases
    (``<cache>.bases.lock``): its one file takes one writer at a time."""
    stem = str(cache_dir).rstrip("/") + (".bases" if fmt == "hdf5" else f".basis-{name}")
    return as_location(stem)


class BasisLock:
    """The exclusion of a basis writer (``tcskd basis``), so that bases of one cache are fitted side by side:

    - the cache's own arrays: a *shared* hold of the cache's writer lock (:class:`WriterLock`): a writer of the
      cache (``tcskd cache`` completing it) is refused or waited for (``wait``), and cannot start meanwhile;
      basis writers do not exclude each other. Where that lock is a lease (an object store, no flock) it is
      checked, not held: the cache stage writes only into incomplete caches, which a basis writer refuses.
    - the basis: an exclusive lock per basis name (:func:`basis_lock_stem`); a second writer of the same name
      is refused (``LockedError``, exit code 3) or waits (``wait``). An HDF5 cache takes one basis writer.

    Readers (training, ``tcskd eval``) take no lock: a basis appears whole (tcskd.store.bases).
    """

    def __init__(self, cache_dir: "Path | RemotePath", name: str, fmt: str = "zarr", wait: bool = False) -> None:
        self.cache = cache_dir
        self.name = name
        what = (f"a basis of HDF5 cache {cache_dir} (an HDF5 file takes one writer at a time)" if fmt == "hdf5"
                else f"basis '{name}' of cache {cache_dir}")
        self._cache_lock = _Lock(cache_dir, f"cache {cache_dir}", wait, shared=True)
        self._basis_lock = _Lock(basis_lock_stem(cache_dir, name, fmt), what, wait)

    def __enter__(self) -> "BasisLock":
        self._cache_lock.__enter__()
        try:
            self._basis_lock.__enter__()
        except BaseException:
            self._cache_lock.__exit__(None)
            raise
        return self

    def __exit__(self, exc_type: object = None, *exc: object) -> None:
        try:
            self._basis_lock.__exit__(exc_type, *exc)
        finally:
            self._cache_lock.__exit__(exc_type, *exc)

    @staticmethod
    def try_basis(cache_dir: "Path | RemotePath", name: str, fmt: str = "zarr") -> "_Lock | None":
        """The exclusive lock of basis ``name``, taken now if free (release it with ``__exit__``), else None."""
        lock = _Lock(basis_lock_stem(cache_dir, name, fmt), f"basis '{name}' of cache {cache_dir}")
        try:
            return lock.__enter__()
        except LockedError:
            return None
