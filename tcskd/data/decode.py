"""Encoded images (a file's bytes, a tar member, a dataset cell) -> uint8 RGB arrays, by PIL."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from tcskd.errors import DataError


def read_rgb(path: Path) -> np.ndarray:
    """The image file at ``path`` as H x W x 3 uint8, or a DataError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DataError(f"unreadable image {path}: {e}") from e


def decode_rgb(data: bytes, what: str) -> np.ndarray:
    """An encoded image (``what`` names it in errors) as H x W x 3 uint8, or a DataError naming it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:
        raise DataError(f"unreadable image {what}: {e}") from e
