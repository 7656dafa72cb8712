"""Encoded images (a file's bytes, a tar member, a dataset cell) -> uint8 RGB arrays, by PIL.

:func:`decode_rgb_reduced` decodes a JPEG at 1/2, 1/4 or 1/8 of its size where the caller allows it: libjpeg's
DCT scaling (PIL's draft mode) skips most of the inverse transform and upsampling, so a reduced decode costs a
fraction of a whole one.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, NamedTuple

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


#: The reductions a JPEG decoder offers (libjpeg's DCT scaling), largest first.
JPEG_REDUCTIONS = (8, 4, 2)


class Reduced(NamedTuple):
    """What :func:`decode_rgb_reduced` gives: the image, the full size of the encoded image, the reduction used."""

    image: np.ndarray
    """H' x W' x 3 uint8: ceil(H / reduction) x ceil(W / reduction)."""
    full_size: tuple[int, int]
    """(H, W) of the encoded image, read from its header."""
    reduction: int
    """1 (decoded whole: not a JPEG, or the caller chose 1), 2, 4 or 8."""


def decode_rgb_reduced(data: bytes, what: str, reduction: Callable[[int, int], int]) -> Reduced:
    """An encoded image as uint8 RGB, a JPEG decoded at ``1 / reduction(H, W)`` of its size (1, 2, 4 or 8; the
    full size H x W is read from the header before anything is decoded), any other format whole (``reduction``
    is not called). A DataError naming ``what`` when it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            s = 1
            if im.format == "JPEG":
                s = int(reduction(h, w))
                if s not in (1, *JPEG_REDUCTIONS):
                    raise ValueError(f"a JPEG decodes at 1/1, 1/2, 1/4 or 1/8, not 1/{s}")
                if s > 1:
                    # PIL picks the largest reduction r <= min(W // (W // s), H // (H // s)), which is s
                    # whenever W, H >= 2 s; the size it reports says which one it took.
                    im.draft("RGB", (w // s, h // s))
                    if im.size == (w, h):  # draft refused (a JPEG of several tiles): decoded whole
                        s = 1
                    elif im.size != (-(-w // s), -(-h // s)):
                        raise ValueError(f"a reduced decode gave {im.size} for {w} x {h} at 1/{s}")
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            return Reduced(arr, (h, w), s)
    except Exception as e:
        raise DataError(f"unreadable image {what}: {e}") from e
