"""Segmentation data: the ``builtin:mnist-seg`` composer and the checks that masks are class-id maps.

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

import logging
from dataclasses import dataclass

import numpy as np

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
