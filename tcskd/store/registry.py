"""Where caches live, how they are named, and how writers exclude each other.

A cache's key is the first 16 hex digits of the sha256 of its identity
(canonical JSON): the same inputs always map to the same directory, so a
repeated command is a cache hit, and a different teacher, weights,
preprocessing, dataset, split, view count or dtype never collides.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from tcskd.store.backends import detect_format, open_store
from tcskd.store.manifest import Manifest
from tcskd.store.paths import RemotePath, as_location, is_remote
from tcskd.errors import LockedError, StoreError

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


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``<dir>.lock`` beside a cache.

    The kernel drops it when the holder dies (even by SIGKILL), so a crashed
    writer never leaves a stale lock behind. Object stores (fsspec URLs) have
    no such lock: there, run one writer (torchrun's ranks coordinate).
    """

    def __init__(self, cache_dir: "Path | RemotePath", wait: bool = False) -> None:
        self.remote = is_remote(cache_dir)
        self.path = Path(str(cache_dir).rstrip("/") + ".lock")
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> "WriterLock":
        if self.remote:
            log.debug("no writer lock on an object store")
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

    def __exit__(self, *exc: object) -> None:
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
        if is_remote(cache_dir):
            return False
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
