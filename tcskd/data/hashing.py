"""sha256 of files (dataset fingerprints, teacher weights), memoised in this process and on disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# sha256 memo: (resolved path, size, st_mtime_ns, st_ctime_ns, st_ino, st_dev) -> digest, in this process and in a small JSON file, so
# that a multi-GB teacher's weights are hashed once rather than on every `tcskd cache`.
_MemoKey = tuple[str, int, int, int, int, int]
_MEMO_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")
_MEMO: dict[_MemoKey, str] = {}
_MEMO_MAX_ENTRIES = 1000  # the on-disk memo keeps the most recently hashed files (one entry per path)


def hash_memo_path() -> Path | None:
    """The on-disk memo: ``$TCSKD_HASH_MEMO``, else ``($XDG_CACHE_HOME or ~/.cache)/tcskd/sha256-memo.json``."""
    if env := os.environ.get("TCSKD_HASH_MEMO"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    try:
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    except RuntimeError:  # no home directory to be found
        return None
    return base / "tcskd" / "sha256-memo.json"


def _read_memo(path: Path) -> dict[str, dict]:
    """The memo's entries by path; empty (and a debug line) when it is missing, unreadable or malformed."""
    try:
        entries = json.loads(path.read_text())["entries"]
        if not isinstance(entries, dict):
            raise TypeError(f"'entries' is a {type(entries).__name__}")
        return entries
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError) as e:
        log.debug("ignoring sha256 memo %s: %s", path, e)
        return {}


def _write_memo(path: Path, key: _MemoKey, digest: str) -> None:
    """Add ``key -> digest`` to the memo file: temp file + os.replace; a failure is logged at debug and ignored."""
    tmp = None
    try:
        entries = _read_memo(path)
        entries.pop(key[0], None)  # re-inserted last: the newest entries survive the cap
        entries[key[0]] = {**dict(zip(_MEMO_FIELDS, key[1:])), "sha256": digest}
        entries = dict(list(entries.items())[-_MEMO_MAX_ENTRIES:])
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        tmp = None
    except (OSError, ValueError, TypeError) as e:
        log.debug("cannot update sha256 memo %s: %s", path, e)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _sha256_contents(path: Path | str) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path | str) -> str:
    """The sha256 of a file (dataset fingerprints, teacher weights).

    Memoised by (resolved path, size, mtime, ctime, inode, device), in this process and on disk
    (``hash_memo_path()``): an unchanged file is not read again; any change of these hashes it afresh.
    The ctime is set by the kernel on every write, so a rewrite whose mtime was put back (``cp -p``,
    ``touch -r``, ``rsync -t``) still counts as a change.
    """
    resolved = Path(path).resolve()
    st = resolved.stat()
    key: _MemoKey = (str(resolved), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    if digest := _MEMO.get(key):
        return digest
    memo = hash_memo_path()
    entry = _read_memo(memo).get(key[0]) if memo is not None else None
    if (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            and tuple(entry.get(f) for f in _MEMO_FIELDS) == key[1:]):
        digest = entry["sha256"]
        log.debug("sha256 of %s from the memo %s", resolved, memo)
    else:
        digest = _sha256_contents(resolved)
        if memo is not None:
            _write_memo(memo, key, digest)
    _MEMO[key] = digest
    return digest


