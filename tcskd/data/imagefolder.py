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
from tcskd.data.registry import Reader, register
from tcskd.errors import DataError
from tcskd.source import Source

IMAGE_EXTS = segdata.IMAGE_EXTS


def _imagefolder(spec: str, root: Path, split: str) -> Source:
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    names = ["train", "test"] if split == "all" else [split]
    class_root = root / "train" if (root / "train").is_dir() else root / names[0]
    if not class_root.is_dir():
        raise DataError(f"image folder {root} has no '{names[0]}' folder (expected ROOT/<split>/<class>/<image>)")
    if segdata.is_mask_folder(class_root):
        return _mask_folder(spec, root, split, names)
    classes = sorted(d.name for d in class_root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{class_root} has no class folders")
    cls_id = {c: i for i, c in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    indices: list[int] = []
    offset = 0
    h = hashlib.sha256()
    for name in ("train", "test"):
        d = root / name
        if not d.is_dir():
            continue
        entries = []
        for c in sorted(p.name for p in d.iterdir() if p.is_dir()):
            if c not in cls_id:
                raise DataError(f"{d / c}: class '{c}' is not among the train split's classes")
            for dirpath, _, fnames in os.walk(d / c):
                for fn in fnames:
                    if Path(fn).suffix.lower() in IMAGE_EXTS:
                        entries.append((str(Path(dirpath, fn).relative_to(d)), cls_id[c]))
        entries.sort()
        if name in names:
            for j, (rel, lab) in enumerate(entries):
                files.append(d / rel)
                labels.append(lab)
                indices.append(offset + j)
                h.update(f"{name}/{rel}:{(d / rel).stat().st_size}\n".encode())
        offset += len(entries)
    if not files and not any((root / n).is_dir() for n in names):
        raise DataError(f"image folder {root} has no '{split}' split")

    return Source(spec, split, np.asarray(indices, np.int64), np.asarray(labels, np.int64),
                  len(classes), 3, h.hexdigest(), load=lambda i: read_rgb(files[i]), describe=lambda i: str(files[i]),
                  encoded=lambda i: files[i].read_bytes())


def _mask_folder(spec: str, root: Path, split: str, names: list[str]) -> Source:
    """``ROOT/<split>/images/`` + ``ROOT/<split>/masks/``: a segmentation source (labels -1)."""
    f = segdata.scan_mask_folder(root, names)
    return Source(spec, split, f.indices, np.full(len(f.indices), -1, np.int64), f.num_classes, 3, f.fingerprint,
                  load=lambda i: read_rgb(f.images[i]), describe=lambda i: str(f.images[i]),
                  load_mask=lambda i: segdata.read_mask(f.masks[i], f.images[i], f.num_classes))


register(Reader("imagefolder", "imagefolder:ROOT", lambda spec, arg, split: _imagefolder(spec, Path(arg), split)))
