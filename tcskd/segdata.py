"""Segmentation data: the ``builtin:mnist-seg`` composer, npz masks and mask folders, and their checks.

A mask is an H x W map of class ids (uint8), 255 = ignore (a pixel without a label), of its image's size.
:func:`npz_masks` checks an npz ``y`` of shape N x H x W; :func:`scan_mask_folder` and :func:`read_mask`
read ``ROOT/<split>/images/`` + ``ROOT/<split>/masks/`` (the layout is in tcskd/data.py's docstring).
Every problem is one :class:`DataError` line naming the file, the array or mask and the first bad row.

``builtin:mnist-seg`` (see :func:`compose_mnist_seg`) places MNIST digits on 64 x 64 greyscale canvases:

- Each split's canvases are made from that split's digits only (``mnist5k_split``: 4,000 train, 1,000
  test digits), each digit used exactly once: 2,000 train canvases and 500 test canvases. A canvas holds
  1, 2 or 3 digits; per split a third (rounded up) of the canvases hold one digit, as many hold three,
  the rest two (train: 667 / 666 / 667 canvases, test: 167 / 166 / 167), in a seeded order.
- A digit is rescaled by a seeded factor in [0.85, 1.15] (bilinear, 24 to 32 px) and placed at a seeded
  position where its ink box (pixels >= ``RIM``) keeps one pixel of clearance from the other digits' ink
  boxes (positions drawn uniformly among the free ones; should none be free, the canvas is drawn again
  with the digits one per quadrant, which always fits).
- The canvas is a smooth seeded background texture in [0, ``TEXTURE_MAX``] with each digit drawn over it
  (pixelwise maximum).
- Mask: 1 + the digit's class where the digit's pixel is ink (>= ``INK``), 255 (ignore) on its faint
  anti-aliased rim ([``RIM``, ``INK``)), 0 (background) everywhere else. Since ``TEXTURE_MAX < RIM``, the
  mask agrees with the canvas: ink pixels are exactly those >= ``INK``, background those < ``RIM``.
- 11 classes: background + 10 digits; images carry no image-level label (-1).

Everything is numpy with fixed seeds: the same arrays in every process and on every machine.
:data:`MNIST_SEG_VERSION` enters the dataset's fingerprint; change it whenever the output changes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tcskd.errors import DataError, MissingSplitError

log = logging.getLogger(__name__)

MNIST_SEG_VERSION = "mnist-seg-v1"
CANVAS = 64
INK = 128
RIM = 32
TEXTURE_MAX = 24
SCALES = (0.85, 1.15)
MAX_DIGITS = 3
NUM_CLASSES = 11
IGNORE = 255
SPLIT_SEEDS = {"train": 1, "test": 2}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Composed:
    """A split of mnist-seg: ``images`` N x 64 x 64 x 1 uint8, ``masks`` N x 64 x 64 uint8, ``digits``
    N x 3 int64 (the MNIST rows drawn on each canvas, -1 where a canvas holds fewer)."""

    images: np.ndarray
    masks: np.ndarray
    digits: np.ndarray


def digit_counts(n_digits: int, rng: np.random.Generator) -> np.ndarray:
    """Digits per canvas (1, 2 or 3, summing to ``n_digits``): k ones, k threes, the rest twos, shuffled;
    k = min(ceil(N / 3), N // 2) for N = n_digits // 2 canvases (plus one single-digit canvas when n_digits is odd)."""
    n = n_digits // 2
    k = min((n + 2) // 3, n // 2)
    counts = np.concatenate([np.full(k, 1), np.full(n - 2 * k, 2), np.full(k, 3)]).astype(np.int64)
    counts = counts[rng.permutation(len(counts))]
    if n_digits % 2:
        counts = np.append(counts, 1)
    assert counts.sum() == n_digits
    return counts


def resize_bilinear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """A 2-D float array resized by bilinear interpolation at pixel centres (no antialiasing)."""
    img = np.asarray(img, np.float32)

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(np.int64)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

    r0, r1, fr = axis(img.shape[0], height)
    c0, c1, fc = axis(img.shape[1], width)
    rows = img[r0] * (1 - fr)[:, None] + img[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc)[None, :] + rows[:, c1] * fc[None, :]


def _texture(rng: np.random.Generator) -> np.ndarray:
    coarse = rng.random((5, 5)).astype(np.float32)
    return resize_bilinear(coarse, CANVAS, CANVAS) * TEXTURE_MAX


def _ink_box(patch: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(patch >= RIM)
    if len(ys) == 0:  # an empty digit: a 1-pixel box in its middle
        c = patch.shape[0] // 2
        return c, c + 1, c, c + 1
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _free_position(rng: np.random.Generator, size: int, box: tuple[int, int, int, int],
                   taken: list[tuple[int, int, int, int]]) -> tuple[int, int] | None:
    """A uniformly drawn top-left corner for a ``size`` patch whose ink ``box`` stays 1 px clear of ``taken``."""
    span = np.arange(CANVAS - size + 1)
    y0, x0 = span[:, None], span[None, :]
    free = np.ones((len(span), len(span)), bool)
    by0, by1, bx0, bx1 = box
    for ty0, ty1, tx0, tx1 in taken:
        apart_y = (y0 + by1 + 1 <= ty0) | (ty1 + 1 <= y0 + by0)
        apart_x = (x0 + bx1 + 1 <= tx0) | (tx1 + 1 <= x0 + bx0)
        free &= apart_y | apart_x
    cand = np.flatnonzero(free)
    if len(cand) == 0:
        return None
    pick = int(cand[rng.integers(len(cand))])
    return pick // len(span), pick % len(span)


def _place(rng: np.random.Generator, patches: list[np.ndarray]) -> list[tuple[int, int]] | None:
    taken: list[tuple[int, int, int, int]] = []
    spots = []
    for patch in patches:
        box = _ink_box(patch)
        pos = _free_position(rng, patch.shape[0], box, taken)
        if pos is None:
            return None
        spots.append(pos)
        taken.append((pos[0] + box[0], pos[0] + box[1], pos[1] + box[2], pos[1] + box[3]))
    return spots


def _quadrants(rng: np.random.Generator, patches: list[np.ndarray]) -> list[tuple[int, int]]:
    half = CANVAS // 2
    quads = rng.permutation(4)[:len(patches)]
    return [((q // 2) * half + int(rng.integers(half - p.shape[0] + 1)),
             (q % 2) * half + int(rng.integers(half - p.shape[0] + 1))) for q, p in zip(quads, patches)]


def _canvas(rng: np.random.Generator, digits: list[np.ndarray], classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One canvas (64 x 64 uint8) and its mask from its digits (28 x 28 uint8) and their classes."""
    patches = []
    for d in digits:
        size = int(round(28 * rng.uniform(*SCALES)))
        patches.append(np.clip(np.round(resize_bilinear(d, size, size)), 0, 255))
    spots = _place(rng, patches)
    if spots is None:
        spots = _quadrants(rng, patches)
    canvas = _texture(rng)
    mask = np.zeros((CANVAS, CANVAS), np.uint8)
    for patch, cls, (y0, x0) in zip(patches, classes, spots):
        s = patch.shape[0]
        region = canvas[y0:y0 + s, x0:x0 + s]
        np.maximum(region, patch, out=region)
        m = mask[y0:y0 + s, x0:x0 + s]
        m[(patch >= RIM) & (patch < INK)] = IGNORE
        m[patch >= INK] = 1 + cls
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), mask


def compose_mnist_seg(x: np.ndarray, y: np.ndarray, rows: np.ndarray, seed: int) -> Composed:
    """Canvases made from the MNIST digits ``x[rows]`` (N x 28 x 28 [x 1] uint8, classes ``y``), each
    used once, in an order and at places drawn from ``seed``."""
    rng = np.random.default_rng([seed, 0x5E6])
    rows = np.asarray(rows, np.int64)
    counts = digit_counts(len(rows), rng)
    order = rows[rng.permutation(len(rows))]
    starts = np.concatenate([[0], np.cumsum(counts)])
    grey = x.reshape(len(x), 28, 28)
    images = np.empty((len(counts), CANVAS, CANVAS, 1), np.uint8)
    masks = np.empty((len(counts), CANVAS, CANVAS), np.uint8)
    digits = np.full((len(counts), MAX_DIGITS), -1, np.int64)
    for n, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        on = order[a:b]
        digits[n, :len(on)] = on
        images[n, :, :, 0], masks[n] = _canvas(rng, [grey[r] for r in on], [int(y[r]) for r in on])
    return Composed(images, masks, digits)


# -- npz masks ----------------------------------------------------------------

def integral(y: np.ndarray) -> bool:
    """Whether ``y`` holds whole numbers only: an integer or bool dtype, or finite floats without fractions
    (npz labels and masks saved as floats)."""
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        return True
    return bool(np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all())


def npz_masks(y: np.ndarray, key: str, path: Path, x: np.ndarray, xkey: str) -> np.ndarray:
    """An npz ``y`` of shape N x H x W as uint8 masks, or a DataError naming the file, the array and the
    first bad row: the images' H x W must match, values must be class ids in [0, 255) or 255."""
    if len(y) != len(x):
        raise DataError(f"{path}: '{key}' has {len(y)} masks for {len(x)} images in '{xkey}'")
    if y.shape[1:] != x.shape[1:3]:
        raise DataError(f"{path}: '{key}' masks are {y.shape[1]}x{y.shape[2]} px but the images of '{xkey}' "
                        f"are {x.shape[1]}x{x.shape[2]} (row 0)")
    if not integral(y):
        raise DataError(f"{path}: '{key}' holds non-integer mask values ({y.dtype}); expected class ids "
                        f"(255 = ignore)")
    bad = ((y < 0) | (y > IGNORE)).reshape(len(y), -1).any(1) if len(y) else np.zeros(0, bool)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        vals = y[row][(y[row] < 0) | (y[row] > IGNORE)]
        raise DataError(f"{path}: '{key}' row {row} holds the value {vals.reshape(-1)[0]}, neither a class id in "
                        f"[0, 255) nor 255 (ignore)")
    return np.ascontiguousarray(y.astype(np.uint8))


def num_mask_classes(masks: list[np.ndarray]) -> int:
    """The largest class id in the masks + 1 (255 = ignore not counted); 0 when no pixel is labelled."""
    top = -1
    for m in masks:
        ids = np.unique(m)
        ids = ids[ids != IGNORE]
        if len(ids):
            top = max(top, int(ids[-1]))
    return top + 1


# -- mask folders -------------------------------------------------------------

MASK_MODES = {"1", "L", "P", "I", "I;16", "I;16L", "I;16B"}
_SIZES_OK: set[tuple] = set()  # (image, mask, their sizes and mtimes) whose headers agreed, in this process
_CLASSES: dict[str, int] = {}   # folder fingerprint -> largest id + 1, in this process


def is_mask_folder(split_dir: Path) -> bool:
    """Whether a split folder holds ``images/`` and ``masks/`` (a segmentation folder) rather than classes."""
    return (split_dir / "images").is_dir() and (split_dir / "masks").is_dir()


@dataclass(frozen=True)
class MaskFolder:
    """The rows of a segmentation folder's split(s): image and mask files, sample indices, classes."""

    images: list[Path]
    masks: list[Path]
    indices: np.ndarray
    num_classes: int
    fingerprint: str


def _pairs(d: Path) -> list[tuple[str, Path, Path]]:
    """(relative image path, image, mask) of a split folder, sorted; an image without a mask is an error."""
    images_dir, masks_dir = d / "images", d / "masks"
    out = []
    for dirpath, _, fnames in os.walk(images_dir):
        for fn in fnames:
            if Path(fn).suffix.lower() in IMAGE_EXTS:
                img = Path(dirpath, fn)
                rel = img.relative_to(images_dir)
                mask = masks_dir / rel.with_suffix(".png")
                if not mask.is_file():
                    raise DataError(f"image {img} has no mask {mask} (a PNG of class ids with the image's stem)")
                out.append((str(rel), img, mask))
    out.sort(key=lambda t: t[0])
    return out


def _classes_file(root: Path) -> int | None:
    path = root / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path} names no classes (expected one class name per line, background first)")
    return len(names)


def scan_mask_folder(root: Path, names: list[str]) -> MaskFolder:
    """The rows of splits ``names`` of a segmentation folder (``ROOT/<split>/images`` + ``masks``); sample
    indices count train then test. Image and mask sizes are checked from the files' headers."""
    images: list[Path] = []
    masks: list[Path] = []
    indices: list[int] = []
    all_masks: list[Path] = []
    h = hashlib.sha256()
    offset = 0
    for name in ("train", "test"):
        d = root / name
        if not d.is_dir():
            continue
        if not is_mask_folder(d):
            raise DataError(f"{d} has no images/ and masks/ folders, unlike the other split of {root}")
        pairs = _pairs(d)
        for j, (rel, img, mask) in enumerate(pairs):
            h.update(f"{name}/{rel}:{img.stat().st_size}:{mask.stat().st_size}\n".encode())
            all_masks.append(mask)
            if name in names:
                images.append(img)
                masks.append(mask)
                indices.append(offset + j)
        offset += len(pairs)
    if not any((root / n).is_dir() for n in names):
        raise MissingSplitError(f"image folder {root} has no '{'/'.join(names)}' split")
    declared = _classes_file(root)
    h.update(f"classes:{declared}".encode())
    fingerprint = h.hexdigest()
    for img, mask in zip(images, masks):
        check_sizes(img, mask)
    if declared is None and fingerprint not in _CLASSES:
        if len(all_masks) > 1000:
            log.info("%s: reading %d masks for the number of classes (ROOT/classes.txt saves this)", root,
                     len(all_masks))
        _CLASSES[fingerprint] = num_mask_classes([read_mask(m) for m in all_masks])
    num_classes = declared if declared is not None else _CLASSES[fingerprint]
    return MaskFolder(images, masks, np.asarray(indices, np.int64), num_classes, fingerprint)


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except Exception as e:
        raise DataError(f"unreadable image {path}: {e}") from e


def check_sizes(image: Path, mask: Path) -> None:
    """A DataError naming both files when the mask's width x height differs from its image's (headers only)."""
    si, sm = image.stat(), mask.stat()
    key = (str(image), str(mask), si.st_size, si.st_mtime_ns, sm.st_size, sm.st_mtime_ns)
    if key in _SIZES_OK:
        return
    (iw, ih), (mw, mh) = _size(image), _size(mask)
    if (iw, ih) != (mw, mh):
        raise DataError(f"mask {mask} is {mw}x{mh} px but its image {image} is {iw}x{ih}")
    _SIZES_OK.add(key)


def decode_mask(src: "Path | io.BytesIO", name: str) -> np.ndarray:
    """A mask (a PNG file, or its bytes) as H x W uint8 class ids: one channel, values <= 255; else a
    DataError naming it (``name``: how errors name the mask, e.g. ``mask FILE``)."""
    from PIL import Image

    try:
        with Image.open(src) as im:
            if im.mode not in MASK_MODES:
                raise DataError(f"{name} is a {im.mode} image; expected one channel of class ids "
                                f"(PNG mode L or P)")
            arr = np.asarray(im)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"unreadable {name}: {str(e).strip().splitlines()[0] if str(e).strip() else e}") from e
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > IGNORE):
            raise DataError(f"{name} holds the value {int(arr.max() if arr.max() > IGNORE else arr.min())}, "
                            f"neither a class id nor 255 (ignore)")
        arr = arr.astype(np.uint8)
    return arr


def read_mask(mask: Path, image: Path | None = None, num_classes: int | None = None) -> np.ndarray:
    """A mask PNG as H x W uint8 class ids, checked: one channel, values in [0, num_classes) or 255, and
    (given its image) the image's size; else a DataError naming the file(s)."""
    arr = decode_mask(mask, f"mask {mask}")
    if image is not None:
        (iw, ih) = _size(image)
        if arr.shape != (ih, iw):
            raise DataError(f"mask {mask} is {arr.shape[1]}x{arr.shape[0]} px but its image {image} is {iw}x{ih}")
    if num_classes is not None:
        bad = (arr >= num_classes) & (arr != IGNORE)
        if bad.any():
            raise DataError(f"mask {mask} holds class {int(arr[bad][0])}, outside the {num_classes} classes "
                            f"(ids 0..{num_classes - 1}, 255 = ignore)")
    return arr
