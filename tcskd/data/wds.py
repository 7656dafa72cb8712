"""``wds:ROOT``: WebDataset tar shards (what img2dataset writes and timm / open_clip read).

``ROOT`` is a local folder or an fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``) holding
``ROOT/train/*.tar`` and ``ROOT/test/*.tar``, shards in name order. A sample is a run of consecutive tar
members sharing a key (WebDataset's convention: a member's name up to the first dot of its basename; the
rest, lower-cased, is its extension): one image (``jpg``, ``jpeg``, ``png`` or ``webp``) and its class
(``cls``, an integer as text). Where the first sample has a ``seg.png`` (a one-channel PNG of class ids,
255 = ignore, of the image's size) the set is a segmentation set: every sample needs one, labels are -1
and ``num_classes`` counts the mask classes. ``ROOT/classes.txt`` (one class name per line), when present,
gives ``num_classes``; else it is the largest ``cls`` (or mask id) + 1. Other members (json, txt) are
ignored. A sample's index is its position in that order, test after train.

Rows are read by random access (the cache stage writes and resumes by chunk, ``--limit`` takes a subset):
the shards are indexed once (tar headers and the small ``cls`` / ``seg.png`` members; each shard read once,
sequentially; shards in a thread pool) into a saved index (:mod:`tcskd.data.index`) of member offsets,
reused while the shards' names, sizes and mtimes (ETags) are unchanged. Reading a row is one seek + read
in its shard, opened lazily by the process that reads it: forked DataLoader workers and torchrun ranks
each open only the shards their rows are in, and keep a few open (least recently used closed first).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tarfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tcskd import segdata
from tcskd.data import index as saved
from tcskd.data.decode import decode_rgb
from tcskd.data.registry import Reader, register
from tcskd.errors import DataError
from tcskd.source import Source

log = logging.getLogger(__name__)

KIND = "wds"
SPLIT_DIRS = ("train", "test")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image extensions, in the order of preference when a sample has several."""
MASK_EXT = "seg.png"
LAYOUT = 1
"""Enters the index's signature and the fingerprints: bump it when either changes."""
MAX_OPEN = 8
"""Shard files a process keeps open per source."""
REMOTE_BLOCK = 1 << 20
"""Read-ahead of a remote shard's reader: the cache stage reads rows in runs (a chunk, a batch), so one
request serves ~16 rows of ~60 KB, while a random read costs about one row's latency more. Indexing reads
shards start to end in blocks 8 times larger."""
INDEX_THREADS = 8
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members like __key__ are not sample data
_STAMPS = ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created")


# -- where the shards are ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Root:
    """The folder of a ``wds:`` spec: an absolute local path, or a URL (no trailing slash)."""

    location: str

    @property
    def remote(self) -> bool:
        return "://" in self.location

    def fs(self) -> tuple[Any, str]:
        """(fsspec filesystem, path inside it) of a remote root; a missing package or protocol is a DataError."""
        import fsspec

        try:
            return fsspec.core.url_to_fs(self.location)
        except ImportError as e:
            raise DataError(f"wds:{self.location} needs an optional package: {_one_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - an unknown protocol, a malformed URL
            raise DataError(f"cannot read wds:{self.location}: {_one_line(e)}") from None

    def path(self, *parts: str) -> str:
        """``parts`` below the root: a local path, or a path inside the remote filesystem."""
        base = self.fs()[1].rstrip("/") if self.remote else self.location
        return "/".join([base, *parts])


def _root(arg: str) -> _Root:
    arg = arg.removeprefix("file://")
    if "://" in arg:
        return _Root(arg.rstrip("/"))
    return _Root(str(Path(arg).expanduser().resolve()))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 300 else text[:297] + "..."


def _stamp(info: dict[str, Any]) -> str:
    return next((str(info[k]) for k in _STAMPS if info.get(k) is not None), "")


def _list_split(root: _Root, split: str) -> list[tuple[str, int, str]] | None:
    """The ``.tar`` shards of ``ROOT/<split>`` as (name, size, mtime or ETag), in name order; None when the
    folder is absent. One listing of the folder."""
    if not root.remote:
        d = Path(root.location, split)
        if not d.is_dir():
            return None
        out = []
        with os.scandir(d) as it:
            for e in it:
                if e.name.endswith(".tar") and e.is_file():
                    st = e.stat()
                    out.append((e.name, st.st_size, str(st.st_mtime_ns)))
        return sorted(out)
    fs, _ = root.fs()
    path = root.path(split)
    try:
        fs.invalidate_cache(path)
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - connection refused, access denied, DNS: all one line
        raise DataError(f"cannot list wds:{root.location}/{split}: {_one_line(e)}") from None
    out = []
    for info in entries:
        name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
        if info.get("type", "file") != "file" or not name.endswith(".tar"):
            continue
        size = info.get("size")
        if size is None:  # an HTTP index page lists links without sizes
            info = fs.info(info["name"])
            size = info.get("size")
        out.append((name, int(size or 0), _stamp(info)))
    return sorted(out)


def _listing(root: _Root) -> dict[str, Any]:
    """The shards of both split folders and ``classes.txt``'s size and stamp: the index's signature.
    A missing root, train folder or train shard is a DataError."""
    train = _list_split(root, "train")
    if train is None:
        if not _exists(root, root.path()):
            raise DataError(f"wds root not found: {root.location}")
        raise DataError(f"wds:{root.location} has no 'train' folder (expected ROOT/train/*.tar)")
    if not train:
        raise DataError(f"wds:{root.location}/train holds no .tar shards")
    classes = None
    if not root.remote:
        p = Path(root.location, "classes.txt")
        if p.is_file():
            st = p.stat()
            classes = [st.st_size, str(st.st_mtime_ns)]
    else:
        fs, _ = root.fs()
        try:
            info = fs.info(root.path("classes.txt"))
            classes = [int(info.get("size") or 0), _stamp(info)]
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001
            raise DataError(f"cannot read wds:{root.location}/classes.txt: {_one_line(e)}") from None
    return {"layout": LAYOUT, "train": train, "test": _list_split(root, "test") or [], "classes": classes}


def _exists(root: _Root, path: str) -> bool:
    if not root.remote:
        return os.path.isdir(path)
    try:
        return bool(root.fs()[0].exists(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot reach wds:{root.location}: {_one_line(e)}") from None


def _open_shard(root: _Root, name: str, sequential: bool = False) -> BinaryIO:
    """Shard ``name`` (``train/x.tar``) opened for reading; logged at debug level, one line per open."""
    log.debug("open shard %s", name)
    if not root.remote:
        return open(os.path.join(root.location, name), "rb")
    fs, _ = root.fs()
    return fs.open(root.path(name), "rb", block_size=REMOTE_BLOCK * (8 if sequential else 1),
                   cache_type="readahead")


def _classes_txt(root: _Root) -> int:
    """The number of class names in ``ROOT/classes.txt`` (present: the listing found it)."""
    try:
        if root.remote:
            text = root.fs()[0].cat_file(root.path("classes.txt")).decode()
        else:
            text = Path(root.location, "classes.txt").read_text()
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read wds:{root.location}/classes.txt: {_one_line(e)}") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"wds:{root.location}/classes.txt names no classes (expected one class name per line)")
    return len(names)


# -- the index -----------------------------------------------------------------------------------------

@dataclass
class _Shard:
    """One shard's samples as arrays (built by :func:`_scan`)."""

    name: str                      # train/x.tar
    size: int
    keys: dict[str, np.ndarray]    # pack_strings
    offset: np.ndarray             # int64: the image member's data
    nbytes: np.ndarray             # int64: its size
    ext: np.ndarray                # uint8: index into IMAGE_EXTS
    label: np.ndarray              # int64: cls, -1 where absent
    mask_offset: np.ndarray        # int64: seg.png's data, -1 where absent
    mask_nbytes: np.ndarray        # int64
    no_cls: str | None             # the first key without a cls
    bad_cls: str | None            # the first cls that is not an integer, as an error message
    mask_top: int                  # the largest class id in the masks (255 not counted), -1 when none

    def __len__(self) -> int:
        return len(self.offset)

    def key(self, j: int) -> str:
        return saved.unpack_string(self.keys["blob"], self.keys["offsets"], j)


def _scan(root: _Root, name: str, size: int) -> _Shard:
    """Index one shard, reading it once from start to end (a local one by seeking over the image data)."""
    keys: list[str] = []
    cols: dict[str, list[int]] = {k: [] for k in ("offset", "nbytes", "ext", "label", "mask_offset", "mask_nbytes")}
    no_cls = bad_cls = None
    top = -1
    key: str | None = None
    members: dict[str, tarfile.TarInfo] = {}
    cls_text: bytes | None = None

    def flush() -> None:
        nonlocal no_cls, bad_cls
        if key is None:
            return
        img = next((e for e in IMAGE_EXTS if e in members), None)
        if img is None:
            raise DataError(f"{name}:{key} has no image (a {', '.join(IMAGE_EXTS)} member)")
        m = members[img]
        keys.append(key)
        cols["offset"].append(m.offset_data)
        cols["nbytes"].append(m.size)
        cols["ext"].append(IMAGE_EXTS.index(img))
        label = -1
        if cls_text is None:
            no_cls = no_cls or key
        else:
            try:
                label = int(cls_text.decode().strip())
                if label < 0:
                    raise ValueError
            except ValueError:
                bad_cls = bad_cls or f"{name}:{key}: cls '{cls_text[:40].decode(errors='replace').strip()}' " \
                                     f"is not a class id (an integer >= 0)"
                label = -1
        cols["label"].append(label)
        mask = members.get(MASK_EXT)
        cols["mask_offset"].append(-1 if mask is None else mask.offset_data)
        cols["mask_nbytes"].append(0 if mask is None else mask.size)

    with _open_shard(root, name, sequential=True) as f:
        try:
            tf = tarfile.open(fileobj=f, mode="r|" if root.remote else "r:")
            end = 0  # where the last member's data (padded to 512-byte blocks) ends
            while (m := tf.next()) is not None:
                tf.members = []  # one shard's TarInfos are not kept (webdataset does the same)
                end = m.offset_data + -(-m.size // 512) * 512
                if not m.isreg() or _META.match(m.name):
                    continue
                if m.offset_data + m.size > size:
                    raise DataError(f"{name} is truncated: member {m.name} ends past the shard's {size} bytes")
                base = m.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                dot = len(m.name) - len(base) + base.index(".")
                k, ext = m.name[:dot], m.name[dot + 1:].lower()
                if k != key:
                    flush()
                    key, members, cls_text = k, {}, None
                if ext in members or (ext == "cls" and cls_text is not None):
                    raise DataError(f"{name}:{key} has two '{ext}' members")
                if ext == "cls":
                    cls_text = tf.extractfile(m).read()
                elif ext in IMAGE_EXTS or ext == MASK_EXT:
                    members[ext] = m
                    if ext == MASK_EXT:
                        top = max(top, _mask_top(_decode_mask(tf.extractfile(m).read(), f"{name}:{key}")))
            flush()
            if size - end < 1024:  # tarfile and GNU tar end every archive with two zero blocks, at least
                raise DataError(f"{name} ends without the tar end-of-archive blocks: a shard whose writer was cut "
                                f"short (write it again)")
        except tarfile.TarError as e:
            raise DataError(f"{name} is not a tar file ({_one_line(e)})") from None
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a local or remote read failed
            raise DataError(f"cannot read shard {name}: {_one_line(e)}") from None
    n = len(keys)
    big = [j for j in range(n) if cols["nbytes"][j] >= 2**31 or cols["mask_nbytes"][j] >= 2**31]
    if big:
        raise DataError(f"{name}:{keys[big[0]]}: a member of 2 GiB or more is not an image")
    return _Shard(name, size, saved.pack_strings(keys),
                  np.asarray(cols["offset"], np.int64).reshape(n), np.asarray(cols["nbytes"], np.int64).reshape(n),
                  np.asarray(cols["ext"], np.uint8).reshape(n), np.asarray(cols["label"], np.int64).reshape(n),
                  np.asarray(cols["mask_offset"], np.int64).reshape(n),
                  np.asarray(cols["mask_nbytes"], np.int64).reshape(n), no_cls, bad_cls, top)


def _scan_all(root: _Root, shards: list[tuple[str, int]]) -> list[_Shard]:
    """:func:`_scan` of every shard, in a thread pool; the first error in shard order is raised."""
    with ThreadPoolExecutor(max_workers=max(1, min(INDEX_THREADS, len(shards)))) as pool:
        futures = [pool.submit(_scan, root, name, size) for name, size in shards]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _build(root: _Root, listing: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The index's arrays and meta fields, from one scan of every shard."""
    shards = [(f"{split}/{name}", size) for split in SPLIT_DIRS for name, size, _ in listing[split]]
    parts = _scan_all(root, shards)
    n_train = sum(len(p) for p in parts if p.name.startswith("train/"))
    first = next((p for p in parts if len(p)), None)
    seg = first is not None and first.mask_offset[0] >= 0
    declared = _classes_txt(root) if listing["classes"] is not None else None
    for p in parts:
        if seg and (missing := np.flatnonzero(p.mask_offset < 0)).size:
            raise DataError(f"{p.name}:{p.key(int(missing[0]))} has no {MASK_EXT} (the set's first sample has a "
                            f"mask: a segmentation set)")
        if not seg and p.no_cls is not None:
            raise DataError(f"{p.name}:{p.no_cls} has no cls (its class id)")
        if not seg and p.bad_cls is not None:
            raise DataError(p.bad_cls)
    if seg:
        num_classes = declared if declared is not None else max([p.mask_top for p in parts], default=-1) + 1
        if declared is not None and (p := next((p for p in parts if p.mask_top >= declared), None)) is not None:
            raise DataError(f"{p.name} has masks of class {p.mask_top}, outside the {declared} classes of "
                            f"classes.txt (ids 0..{declared - 1}, 255 = ignore)")
    else:
        num_classes = declared if declared is not None else max([int(p.label.max()) for p in parts if len(p)],
                                                               default=-1) + 1
        for p in parts:
            if declared is not None and len(p) and (bad := np.flatnonzero(p.label >= declared)).size:
                j = int(bad[0])
                raise DataError(f"{p.name}:{p.key(j)}: cls {int(p.label[j])} is outside the {declared} classes "
                                f"of classes.txt")
    n = sum(len(p) for p in parts)
    names = saved.pack_strings([p.name for p in parts])
    key_offsets = [np.zeros(1, np.int64)]
    base = 0
    for p in parts:
        key_offsets.append(p.keys["offsets"][1:] + base)
        base += int(p.keys["offsets"][-1])
    arrays = {
        "shard": np.repeat(np.arange(len(parts), dtype=np.int16 if len(parts) < 2**15 else np.int32),
                           [len(p) for p in parts]),
        "offset": _cat([p.offset for p in parts], np.int64),
        "nbytes": _cat([p.nbytes for p in parts], np.int32),
        "ext": _cat([p.ext for p in parts], np.uint8),
        "key_blob": _cat([p.keys["blob"] for p in parts], np.uint8),
        "key_offsets": np.concatenate(key_offsets),
        "shard_blob": names["blob"], "shard_offsets": names["offsets"],
    }
    if seg:
        arrays["mask_offset"] = _cat([p.mask_offset for p in parts], np.int64)
        arrays["mask_nbytes"] = _cat([p.mask_nbytes for p in parts], np.int32)
    else:
        arrays["label"] = _cat([p.label for p in parts], np.int64)
    digests = {split: [_digest(p, seg) for p in parts if p.name.startswith(f"{split}/")] for split in SPLIT_DIRS}
    digests["all"] = digests["train"] + digests["test"]
    fingerprints = {split: _fingerprint(split, d, num_classes, seg) for split, d in digests.items()}
    assert len(arrays["offset"]) == n
    return arrays, {"root": root.location, "n_train": n_train, "n_test": n - n_train, "num_classes": num_classes,
                    "segmentation": bool(seg), "fingerprints": fingerprints}


def _cat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate([a.astype(dtype) for a in arrays]) if arrays else np.zeros(0, dtype)


def _digest(p: _Shard, seg: bool) -> bytes:
    """A shard's content digest from its index: its name and size, each sample's key, image extension and
    member sizes, and its class (or mask size) — no image byte is read."""
    h = hashlib.sha256(f"{p.name}:{p.size}\n".encode())
    h.update(p.keys["blob"].tobytes())
    for a in (p.keys["offsets"], p.nbytes, p.ext.astype(np.int64), p.mask_nbytes if seg else p.label):
        h.update(np.ascontiguousarray(a, "<i8").tobytes())
    return h.digest()


def _fingerprint(split: str, digests: list[bytes], num_classes: int, seg: bool) -> str:
    h = hashlib.sha256(f"wds/{LAYOUT}/{split}/classes={num_classes}/seg={int(seg)}\n".encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()


def _index(root: _Root, rebuild: bool = False) -> saved.SavedIndex:
    """The saved index of ``root``'s shards, built (once, under a lock) when absent or out of date, or when
    ``rebuild`` (``tcskd cache --reindex``)."""
    seen: dict[str, Any] = {}

    def signature() -> dict[str, Any]:
        seen["listing"] = _listing(root)
        return seen["listing"]

    return saved.load_or_build(KIND, root.location, signature, lambda: _build(root, seen["listing"]),
                               rebuild=rebuild)


# -- masks -------------------------------------------------------------------------------------------

def _decode_mask(data: bytes, what: str) -> np.ndarray:
    """An encoded mask as H x W uint8 class ids (one channel; values <= 255), or a DataError naming it."""
    return segdata.decode_mask(io.BytesIO(data), f"the mask of {what}")


def _mask_top(mask: np.ndarray) -> int:
    ids = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)[:segdata.IGNORE])
    return int(ids[-1]) if len(ids) else -1


# -- rows --------------------------------------------------------------------------------------------

class _ShardFiles:
    """Byte ranges of shards, each shard opened on its first read in this process (a forked worker opens
    its own) and kept in an LRU of :data:`MAX_OPEN`. Local shards are read with ``os.pread``."""

    def __init__(self, root: _Root, names: saved.SavedIndex) -> None:
        self.root, self.index = root, names
        self._pid = -1
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._lock = threading.Lock()

    def name(self, shard: int) -> str:
        return saved.unpack_string(self.index["shard_blob"], self.index["shard_offsets"], shard)

    def read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a fresh process (or a forked copy): its own files, its own lock
            for f in self._open.values():
                if isinstance(f, int):  # the forked copy of the parent's descriptor
                    _close(f)
            self._open = OrderedDict()
            self._lock = threading.Lock()
            self._pid = os.getpid()
        with self._lock:
            f = self._open.get(shard)
            if f is None:
                f = self._file(shard)
                self._open[shard] = f
                if len(self._open) > MAX_OPEN:
                    _close(self._open.popitem(last=False)[1])
            else:
                self._open.move_to_end(shard)
            if isinstance(f, int):
                data = os.pread(f, size, offset)
            else:
                f.seek(offset)
                data = f.read(size)
        if len(data) != size:
            raise DataError(f"shard {self.name(shard)} ends before byte {offset + size}: changed since it was "
                            f"indexed?")
        return data

    def _file(self, shard: int) -> Any:
        name = self.name(shard)
        if not self.root.remote:
            log.debug("open shard %s", name)
            return os.open(os.path.join(self.root.location, name), os.O_RDONLY)
        return _open_shard(self.root, name)


def _close(f: Any) -> None:
    try:
        os.close(f) if isinstance(f, int) else f.close()
    except OSError:
        pass


def _source(spec: str, root: _Root, split: str) -> Source:
    idx = _index(root)
    meta = idx.meta
    n_train, n = int(meta["n_train"]), int(meta["n_train"]) + int(meta["n_test"])
    lo, hi = {"train": (0, n_train), "test": (n_train, n), "all": (0, n)}[split]
    files = _ShardFiles(root, idx)
    shard, offset, nbytes = idx["shard"], idx["offset"], idx["nbytes"]
    seg = bool(meta["segmentation"])
    num_classes = int(meta["num_classes"])

    def describe(i: int) -> str:
        s = lo + i
        return f"{files.name(int(shard[s]))}:{saved.unpack_string(idx['key_blob'], idx['key_offsets'], s)}"

    def member(i: int, offsets: np.ndarray, sizes: np.ndarray) -> bytes:
        s = lo + i
        try:
            return files.read(int(shard[s]), int(offsets[s]), int(sizes[s]))
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - I/O of a local or remote file
            raise DataError(f"cannot read {describe(i)}: {_one_line(e)}") from e

    def encoded(i: int) -> bytes:
        return member(i, offset, nbytes)

    def load_mask(i: int) -> np.ndarray:
        what = describe(i)
        mask = _decode_mask(member(i, idx["mask_offset"], idx["mask_nbytes"]), what)
        h, w = _image_size(encoded(i), what)
        if mask.shape != (h, w):
            raise DataError(f"the mask of {what} is {mask.shape[1]}x{mask.shape[0]} px but its image is {w}x{h}")
        bad = (mask >= num_classes) & (mask != segdata.IGNORE)
        if bad.any():
            raise DataError(f"the mask of {what} holds class {int(mask[bad][0])}, outside the {num_classes} classes "
                            f"(ids 0..{num_classes - 1}, 255 = ignore)")
        return mask

    labels = np.full(hi - lo, -1, np.int64) if seg else idx["label"][lo:hi]
    return Source(spec, split, np.arange(lo, hi, dtype=np.int64), labels, num_classes, 3,
                  meta["fingerprints"][split], load=lambda i: decode_rgb(encoded(i), describe(i)),
                  describe=describe, encoded=encoded, load_mask=load_mask if seg else None)


def _image_size(data: bytes, what: str) -> tuple[int, int]:
    """(height, width) from an encoded image's header."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[1], im.size[0]
    except Exception as e:
        raise DataError(f"unreadable image {what}: {_one_line(e)}") from e


def wds_fingerprint(arg: str, split: str) -> str:
    """The fingerprint of ``wds:ARG``'s split from its saved index (built if need be): no image is read."""
    return str(_index(_root(arg)).meta["fingerprints"][split])


register(Reader("wds", "wds:ROOT", lambda spec, arg, split: _source(spec, _root(arg), split),
                lambda spec, arg, split: wds_fingerprint(arg, split),
                reindex=lambda spec, arg: _index(_root(arg), rebuild=True) and None, sequential=True))
