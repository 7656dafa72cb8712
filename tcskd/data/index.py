"""Saved indexes of file-backed sources: built once by one process, saved as ``.npy`` arrays, memory-mapped.

An index lives in its own folder under :func:`index_root` (``$TCSKD_INDEX``, else ``indexes/`` beside the
caches of ``$TCSKD_CACHE`` when they are local, else ``~/.cache/tcskd/indexes``), named by the kind and a hash of the source's
location. ``meta.json`` holds a ``signature`` (something cheap to recompute that changes when the source
does: folders' mtimes, shards' sizes), what the builder wants to keep (class names, fingerprints) and the
build time; every other file is one array, memory-mapped read-only by every process that opens the index,
so forked DataLoader workers share its pages instead of copying Python objects.

:func:`load_or_build` returns the saved index while its signature holds; otherwise it builds one under a
lock (one builder at a time; the others wait and then load it) and saves it atomically (a new folder
renamed into place: a reader never sees half an index).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

#: Bumped when the layout of saved indexes changes: older ones are rebuilt.
INDEX_VERSION = 1
_STARTED = time.time()


def index_root() -> Path:
    """``$TCSKD_INDEX``; else ``$TCSKD_CACHE/indexes`` when the caches' root is local; else
    ``($XDG_CACHE_HOME or ~/.cache)/tcskd/indexes`` (indexes are memory-mapped, so they stay local)."""
    if env := os.environ.get("TCSKD_INDEX"):
        return Path(env)
    root = os.environ.get("TCSKD_CACHE")
    if root and ("://" not in root or root.startswith("file://")):
        return Path(root.removeprefix("file://")) / "indexes"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "tcskd" / "indexes"


def index_dir(kind: str, location: str) -> Path:
    """The folder of the index of the source ``kind`` at ``location`` (an absolute path or a URL)."""
    return index_root() / f"{kind}-{hashlib.sha256(location.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class SavedIndex:
    """A loaded index: its ``meta`` (signature, builder's fields, ``built_at``) and its memory-mapped arrays."""

    path: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def pack_strings(strings: list[str]) -> dict[str, np.ndarray]:
    """Strings as one UTF-8 blob (``blob``, uint8) and ``offsets`` (int64, N + 1): no Python object per row."""
    encoded = [s.encode() for s in strings]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    blob = np.frombuffer(b"".join(encoded), np.uint8) if encoded else np.zeros(0, np.uint8)
    return {"blob": blob, "offsets": offsets}


def unpack_string(blob: np.ndarray, offsets: np.ndarray, i: int) -> str:
    """String ``i`` of a :func:`pack_strings` pair."""
    return blob[int(offsets[i]):int(offsets[i + 1])].tobytes().decode()


def load(path: Path, signature: Any) -> SavedIndex | None:
    """The index saved at ``path`` if its version and signature match (arrays memory-mapped), else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != INDEX_VERSION or meta.get("signature") != _plain(signature):
        return None
    try:
        arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in meta["arrays"]}
    except (OSError, ValueError, KeyError) as e:
        log.warning("saved index %s is unreadable (%s); rebuilding it", path, e)
        return None
    return SavedIndex(path, meta, arrays)


def save(path: Path, signature: Any, arrays: dict[str, np.ndarray], fields: dict[str, Any]) -> None:
    """Write the index into a new hidden folder beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        meta = {"version": INDEX_VERSION, "signature": _plain(signature), "arrays": sorted(arrays),
                "built_at": time.time(), **fields}
        (tmp / "meta.json").write_text(json.dumps(meta))
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.replace(path, old)  # open memory maps of the old index stay valid
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<path>.lock`` (blocking): one process builds an index, the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without flock: build without it (the rename keeps it safe)
            log.debug("no lock on %s.lock (%s)", path, e)
        yield
    finally:
        os.close(fd)


def load_or_build(kind: str, location: str, signature: Callable[[], Any] | None,
                  build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
                  rebuild: bool = False, is_current: Callable[[dict[str, Any]], bool] | None = None) -> SavedIndex:
    """The saved index of ``location`` while ``signature()`` is unchanged, else ``build()`` (arrays, meta
    fields) saved and loaded. Without a ``signature``, ``is_current(meta)`` judges a saved index from what
    its builder kept in ``meta`` (e.g. the mtimes of the folders it walked). ``rebuild`` builds anew
    whatever they say (``--reindex``); under torchrun only rank 0 rebuilds, and the other ranks wait for an
    index built since they started."""
    path = index_dir(kind, location)
    rank = int(os.environ.get("RANK", "0") or 0)
    if rebuild and rank != 0:
        rebuild = False
        _wait_for_fresh(path)

    def current() -> SavedIndex | None:
        found = load(path, signature() if signature is not None else None)
        return found if found is not None and (is_current is None or is_current(found.meta)) else None

    if not rebuild and (found := current()) is not None:
        return found
    with build_lock(path):
        if not rebuild and (found := current()) is not None:  # built by another process meanwhile
            return found
        sig = signature() if signature is not None else None
        t = time.perf_counter()
        log.info("indexing %s (once; saved in %s)", location, path)
        arrays, fields = build()
        save(path, sig, arrays, fields)
        log.info("indexed %s in %.1f s", location, time.perf_counter() - t)
    found = load(path, sig)
    if found is None:
        raise OSError(f"the index just saved in {path} cannot be read back")
    return found


def _wait_for_fresh(path: Path, timeout: float = 3600.0) -> None:
    """Wait until the index at ``path`` was built after this process started (rank 0 is rebuilding it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads((path / "meta.json").read_text()).get("built_at", 0) >= _STARTED - 60:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)


def _plain(obj: Any) -> Any:
    """The signature as JSON would give it back (tuples as lists), so that it compares equal after a save."""
    return json.loads(json.dumps(obj))
