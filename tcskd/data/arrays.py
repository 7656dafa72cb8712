"""Datasets held as arrays: ``npz:FILE`` and the CIFAR python-pickle folders ``cifar10:ROOT``, ``cifar100:ROOT``.

- ``npz:FILE``: ``x`` (N,H,W[,C] uint8) and ``y`` are ``train``; optional ``x_test``/``y_test`` are
  ``test``. ``y`` holds one label per image (N), or masks (N x H x W class ids of the images' size,
  255 = ignore) for segmentation. A sample's index is its row of ``x`` (test rows follow the train rows).
- ``cifar10:ROOT`` / ``cifar100:ROOT``: the python-pickle release's folder (no download).
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np

from tcskd import segdata
from tcskd.data.hashing import sha256_file
from tcskd.data.registry import Reader, register
from tcskd.errors import DataError, MissingSplitError
from tcskd.source import Source


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
        raise MissingSplitError(f"{spec} has no '{split}' split")
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



def _npz_fingerprint(spec: str, arg: str, split: str) -> str:
    if not Path(arg).is_file():
        raise DataError(f"npz file not found: {arg}")
    return sha256_file(arg)


register(Reader("cifar10", "cifar10:ROOT", lambda spec, arg, split: _cifar(spec, "cifar10", Path(arg), split)),
         Reader("cifar100", "cifar100:ROOT", lambda spec, arg, split: _cifar(spec, "cifar100", Path(arg), split)),
         Reader("npz", "npz:FILE", lambda spec, arg, split: _npz(spec, Path(arg), split), _npz_fingerprint))
