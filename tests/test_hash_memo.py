"""sha256_file's memo: an unchanged file is not read again; any change of size, mtime, ctime or inode is; the memo file
can be missing, corrupt or unwritable without failing anything."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tcskd.data import hashing as data


@pytest.fixture
def memo(tmp_path, monkeypatch) -> Path:
    """A fresh memo: an empty in-process dict and $TCSKD_HASH_MEMO under tmp_path."""
    path = tmp_path / "memo" / "sha256-memo.json"
    monkeypatch.setenv("TCSKD_HASH_MEMO", str(path))
    monkeypatch.setattr(data, "_MEMO", {})
    return path


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The paths whose contents sha256_file really reads."""
    seen: list[str] = []
    inner = data._sha256_contents

    def counting(path):
        seen.append(str(path))
        return inner(path)

    monkeypatch.setattr(data, "_sha256_contents", counting)
    return seen


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _weights(tmp_path: Path, content: bytes = b"weights" * 1000) -> Path:
    p = tmp_path / "w.bin"
    p.write_bytes(content)
    return p


def test_memo_hit_in_process_and_from_disk(tmp_path, memo, reads, monkeypatch):
    p = _weights(tmp_path)
    want = _sha(p.read_bytes())
    assert data.sha256_file(p) == want
    assert len(reads) == 1
    assert data.sha256_file(str(p)) == want  # str or Path, same key
    assert len(reads) == 1
    entry = json.loads(memo.read_text())["entries"][str(p.resolve())]
    assert entry["sha256"] == want and entry["size"] == p.stat().st_size
    monkeypatch.setattr(data, "_MEMO", {})  # a new process: only the file memo is left
    assert data.sha256_file(p) == want
    assert len(reads) == 1
    assert not list(memo.parent.glob("*.tmp"))


def test_relative_path_and_symlink_share_the_entry(tmp_path, memo, reads, monkeypatch):
    p = _weights(tmp_path)
    (tmp_path / "link.bin").symlink_to(p)
    monkeypatch.chdir(tmp_path)
    assert data.sha256_file("w.bin") == data.sha256_file(tmp_path / "link.bin") == data.sha256_file(p)
    assert len(reads) == 1


def test_content_change_with_new_mtime_rehashes(tmp_path, memo, reads, monkeypatch):
    p = _weights(tmp_path, b"a" * 4096)
    st = p.stat()
    assert data.sha256_file(p) == _sha(b"a" * 4096)
    p.write_bytes(b"b" * 4096)  # same size, same inode
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert data.sha256_file(p) == _sha(b"b" * 4096)
    assert len(reads) == 2
    monkeypatch.setattr(data, "_MEMO", {})
    assert data.sha256_file(p) == _sha(b"b" * 4096)  # the file memo holds the new digest
    assert len(reads) == 2


def test_rewrite_with_the_mtime_put_back_rehashes(tmp_path, memo, reads):
    # cp -p, touch -r, rsync -t: same size, same mtime, same inode, other bytes; only the ctime tells.
    import time

    p = _weights(tmp_path, b"a" * 4096)
    st = p.stat()
    assert data.sha256_file(p) == _sha(b"a" * 4096)
    time.sleep(0.01)
    with open(p, "r+b") as f:
        f.write(b"b" * 4096)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = p.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert now.st_ctime_ns != st.st_ctime_ns
    assert data.sha256_file(p) == _sha(b"b" * 4096)
    assert len(reads) == 2


def test_size_or_inode_change_rehashes(tmp_path, memo, reads):
    p = _weights(tmp_path, b"a" * 100)
    st = p.stat()
    data.sha256_file(p)
    p.write_bytes(b"a" * 101)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime kept: the size alone must tell
    assert data.sha256_file(p) == _sha(b"a" * 101)
    other = tmp_path / "other.bin"
    other.write_bytes(b"c" * 101)
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    keep = tmp_path / "keep.bin"
    p.rename(keep)  # hold the old inode so the replacement gets a new one
    other.rename(p)
    assert p.stat().st_ino != keep.stat().st_ino
    assert data.sha256_file(p) == _sha(b"c" * 101)  # same size and mtime, new inode
    assert len(reads) == 3


@pytest.mark.parametrize("junk", ["{not json", "[]", '{"entries": 5}', '{"entries": {"X": 1}}', ""])
def test_corrupt_memo_is_ignored_and_replaced(tmp_path, memo, reads, junk):
    p = _weights(tmp_path)
    memo.parent.mkdir(parents=True)
    memo.write_text(junk.replace("X", str(p.resolve())))
    assert data.sha256_file(p) == _sha(p.read_bytes())
    assert len(reads) == 1
    assert json.loads(memo.read_text())["entries"][str(p.resolve())]["sha256"] == _sha(p.read_bytes())


def test_wrong_digest_type_in_memo_is_not_trusted(tmp_path, memo, reads):
    p = _weights(tmp_path)
    st = p.stat()
    memo.parent.mkdir(parents=True)
    entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
             "dev": st.st_dev, "sha256": 7}
    memo.write_text(json.dumps({"version": 1, "entries": {str(p.resolve()): entry}}))
    assert data.sha256_file(p) == _sha(p.read_bytes())
    assert len(reads) == 1


@pytest.mark.parametrize("where", ["file_as_parent", "dir_as_memo"])
def test_unwritable_memo_location_does_not_fail(tmp_path, monkeypatch, reads, where):
    monkeypatch.setattr(data, "_MEMO", {})
    blocker = tmp_path / "blocker"
    if where == "file_as_parent":
        blocker.write_text("a file, not a folder")
        monkeypatch.setenv("TCSKD_HASH_MEMO", str(blocker / "memo.json"))
    else:
        blocker.mkdir()  # reads fail with IsADirectoryError, os.replace onto it fails too
        monkeypatch.setenv("TCSKD_HASH_MEMO", str(blocker))
    p = _weights(tmp_path)
    assert data.sha256_file(p) == _sha(p.read_bytes())
    assert data.sha256_file(p) == _sha(p.read_bytes())  # the in-process memo still works
    assert len(reads) == 1
    assert list(tmp_path.glob(".blocker.*.tmp")) == []  # no temporary file left behind


def test_default_location(monkeypatch, tmp_path):
    monkeypatch.delenv("TCSKD_HASH_MEMO", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.hash_memo_path() == tmp_path / "xdg" / "tcskd" / "sha256-memo.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.hash_memo_path() == tmp_path / "home" / ".cache" / "tcskd" / "sha256-memo.json"


def test_missing_file_still_raises(tmp_path, memo):
    with pytest.raises(FileNotFoundError):
        data.sha256_file(tmp_path / "nope.bin")
