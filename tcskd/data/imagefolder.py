"""``imagefolder:ROOT``: ``ROOT/<split>/<class>/<image>`` (classification), or a segmentation folder.

For segmentation: ``ROOT/<split>/images/<name>.<ext>`` with ``ROOT/<split>/masks/<name>.png`` beside it
(same relative path and stem; a one-channel PNG, mode L or P, of class ids, 255 = ignore, of the image's
size), and optionally ``ROOT/classes.txt`` (one class name per line, background first; without it the
classes are the largest id in any mask + 1). A split folder holding both ``images/`` and ``masks/`` makes
the folder a segmentation one (so a classification set must not name its only classes ``images`` and
``masks``). A sample's index is its position in the split's sorted file list (test after train).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from tcskd import segdata
from tcskd.data.decode import read_rgb
from tcskd.data.index import SavedIndex, load_or_build, pack_strings, unpack_string
from tcskd.data.registry import Reader, register
from tcskd.errors import DataError, MissingSplitError
from tcskd.source import Source

IMAGE_EXTS = segdata.IMAGE_EXTS


def _imagefolder(spec: str, root: Path, split: str) -> Source:
    if "://" in str(spec.partition(":")[2]):
        raise DataError(f"imagefolder: reads local folders only ({spec}); for data on an object store use "
                        f"wds: shards or hfds: parquet")
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    names = ["train", "test"] if split == "all" else [split]
    class_root = root / "train" if (root / "train").is_dir() else root / names[0]
    if not class_root.is_dir():
        raise DataError(f"image folder {root} has no '{names[0]}' folder (expected ROOT/<split>/<class>/<image>)")
    if segdata.is_mask_folder(class_root):
        return _mask_folder(spec, root, split, names)
    idx = folder_index(root)
    counts = idx.meta["counts"]
    if not any(counts.get(n) is not None for n in names):
        raise MissingSplitError(f"image folder {root} has no '{split}' split")
    classes = idx.meta["classes"]
    n_train = counts.get("train") or 0
    start = n_train if split == "test" else 0
    stop = n_train if split == "train" else n_train + (counts.get("test") or 0)
    labels = np.asarray(idx["label"][start:stop], np.int64)
    blob, offsets = idx["blob"], idx["offsets"]
    split_dirs = (root / "train", root / "test")

    def path(i: int) -> Path:
        row = start + i
        sub = unpack_string(blob, offsets, row)
        return split_dirs[int(row >= n_train)] / classes[int(labels[i])] / sub

    return Source(spec, split, np.arange(start, stop, dtype=np.int64), labels, len(classes), 3,
                  idx.meta["fingerprints"][split], load=lambda i: read_rgb(path(i)), describe=lambda i: str(path(i)),
                  encoded=lambda i: path(i).read_bytes())


def folder_index(root: Path, rebuild: bool = False) -> SavedIndex:
    """The saved index of a classification image folder (:mod:`tcskd.data.index`), built by one walk.

    Rows are train's files then test's, each split sorted by its path relative to the split folder (the
    order that defines sample indices). Arrays: ``blob``/``offsets`` (each file's path inside its class
    folder, packed), ``label`` (int32), ``size`` (int64 bytes); meta: ``classes`` (the train split's class
    folders, sorted), ``counts`` per split (None where the split folder is missing), ``fingerprints`` of
    train, test and all (the same as a walk computes them: relative paths and sizes), and ``dirs``: every
    folder walked with its mtime, ctime and size. The index is reused while those hold (adding, removing or renaming
    a file or a class changes its folder's mtime; ``tcskd cache --reindex`` after rewriting files in place).
    """
    location = str(root.resolve())
    return load_or_build("imagefolder", location, None, lambda: _walk(root), rebuild=rebuild,
                         is_current=lambda meta: _unchanged(root, meta))


def _unchanged(root: Path, meta: dict) -> bool:
    """Whether every folder the index walked has the stamp it had then (one stat each, no listing)."""
    try:
        return all(list(_stamp(root / rel)) == stamp for rel, stamp in meta["dirs"])
    except (OSError, KeyError, TypeError, ValueError):
        return False


def _stamp(d: Path) -> tuple[int, int, int]:
    """A folder's (mtime, ctime, size): any entry added, removed or renamed changes it."""
    st = os.stat(d)
    return st.st_mtime_ns, st.st_ctime_ns, st.st_size


def _scan(d: Path, rel: str, files: list[tuple[str, int]], dirs: list) -> None:
    """Add the image files under ``d`` (``rel``: its path below the walk's root) with their sizes to ``files``,
    and ``d`` and each sub-folder with its mtime to ``dirs``."""
    dirs.append((rel, _stamp(d)))
    with os.scandir(d) as it:
        entries = list(it)
    for e in entries:
        name = f"{rel}/{e.name}"
        if e.is_dir():
            _scan(Path(e.path), name, files, dirs)
        elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTS:
            files.append((name, e.stat().st_size))


def _walk(root: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Walk the folder once: the arrays and meta of :func:`folder_index`, or a DataError."""
    class_root = root / "train" if (root / "train").is_dir() else root / "test"
    with os.scandir(class_root) as it:
        classes = sorted(e.name for e in it if e.is_dir())
    if not classes:
        raise DataError(f"{class_root} has no class folders")
    cls_id = {c: i for i, c in enumerate(classes)}
    dirs: list[tuple[str, tuple[int, int, int]]] = [(".", _stamp(root))]
    subs: list[str] = []
    labels: list[int] = []
    sizes: list[int] = []
    counts: dict[str, int | None] = {"train": None, "test": None}
    digests = {"train": hashlib.sha256(), "test": hashlib.sha256(), "all": hashlib.sha256()}
    for name in ("train", "test"):
        d = root / name
        if not d.is_dir():
            continue
        dirs.append((name, _stamp(d)))
        with os.scandir(d) as it:
            present = sorted(e.name for e in it if e.is_dir())
        entries: list[tuple[str, int, int]] = []
        for c in present:
            if c not in cls_id:
                raise DataError(f"{d / c}: class '{c}' is not among the train split's classes")
            found: list[tuple[str, int]] = []
            _scan(d / c, f"{name}/{c}", found, dirs)
            entries += [(rel.split("/", 1)[1], cls_id[c], size) for rel, size in found]
        entries.sort()
        for rel, lab, size in entries:
            line = f"{name}/{rel}:{size}\n".encode()
            digests[name].update(line)
            digests["all"].update(line)
            subs.append(rel.split("/", 1)[1])
            labels.append(lab)
            sizes.append(size)
        counts[name] = len(entries)
    arrays = {**pack_strings(subs), "label": np.asarray(labels, np.int32), "size": np.asarray(sizes, np.int64)}
    return arrays, {"classes": classes, "counts": counts, "dirs": dirs,
                    "fingerprints": {k: h.hexdigest() for k, h in digests.items()}}


def _reindex(spec: str, arg: str) -> None:
    root = Path(arg)
    class_root = root / "train" if (root / "train").is_dir() else root / "test"
    if class_root.is_dir() and not segdata.is_mask_folder(class_root):
        folder_index(root, rebuild=True)


def _mask_folder(spec: str, root: Path, split: str, names: list[str]) -> Source:
    """``ROOT/<split>/images/`` + ``ROOT/<split>/masks/``: a segmentation source (labels -1)."""
    f = segdata.scan_mask_folder(root, names)
    return Source(spec, split, f.indices, np.full(len(f.indices), -1, np.int64), f.num_classes, 3, f.fingerprint,
                  load=lambda i: read_rgb(f.images[i]), describe=lambda i: str(f.images[i]),
                  load_mask=lambda i: segdata.read_mask(f.masks[i], f.images[i], f.num_classes))


register(Reader("imagefolder", "imagefolder:ROOT", lambda spec, arg, split: _imagefolder(spec, Path(arg), split),
                reindex=_reindex))
