"""A dataset split as rows: ``Source`` (images, labels, masks, sample indices), made by ``tcskd.data``.

Kept apart from the dataset specs (tcskd/data.py) so that the segmentation readers (tcskd/segdata.py)
build sources without importing the spec parser.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tcskd.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Source:
    """A split of a dataset: ``source[i] -> (sample_index, image uint8 HWC, label)``.

    ``indices[i]`` is the sample's index in its source; ``labels[i]`` its label
    (-1 when unlabelled). Images are produced by ``load(i)`` so that folder
    datasets decode lazily (in DataLoader workers).
    """

    spec: str
    split: str
    indices: np.ndarray
    labels: np.ndarray
    num_classes: int
    channels: int
    fingerprint: str
    load: Callable[[int], np.ndarray] = field(repr=False)
    describe: Callable[[int], str] = field(repr=False, default=lambda i: f"row {i}")
    load_many: Callable[[np.ndarray], np.ndarray] | None = field(repr=False, default=None)
    """Rows -> their images as one array, for sources held in memory (arrays, MNIST); None for folders."""
    masks: Callable[[np.ndarray], np.ndarray] | None = field(repr=False, default=None)
    """Segmentation sources held in memory: rows -> their masks, B x H x W uint8 class ids (255 = ignore)."""
    load_mask: Callable[[int], np.ndarray] | None = field(repr=False, default=None)
    """Segmentation sources: row -> its mask H x W uint8, decoded lazily for folders (use :meth:`mask`)."""
    encoded: Callable[[int], bytes] | None = field(repr=False, default=None)
    """Sources of encoded files (image folders, tar shards, HF datasets): row -> the image file's bytes, for
    decoders that work on the encoded image (a reduced-size JPEG decode); ``load(i)`` decodes the same bytes."""

    @property
    def has_masks(self) -> bool:
        """A segmentation source: every row has a mask of its image's size (``num_classes`` counts the mask
        classes, background included)."""
        return self.masks is not None or self.load_mask is not None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, int]:
        return int(self.indices[i]), self.load(i), int(self.labels[i])

    def mask(self, i: int) -> np.ndarray:
        """The mask of row ``i``: H x W uint8 class ids in [0, num_classes), 255 = ignore; or a DataError
        naming the sample."""
        if not self.has_masks:
            raise DataError(f"{self.spec} has no masks (a segmentation dataset has per-pixel labels)")
        try:
            m = self.load_mask(i) if self.load_mask is not None else self.masks(np.asarray([i], np.int64))[0]
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"unreadable mask of {self.describe(i)}: {e}") from e
        m = np.asarray(m)
        if m.ndim != 2 or m.dtype != np.uint8:
            raise DataError(f"the mask of {self.describe(i)} is {m.dtype} {m.shape}; expected H x W uint8 class ids")
        return m

    def image(self, i: int, channels: int | None = None) -> np.ndarray:
        """The image of row ``i`` (C made ``channels`` when given, see :func:`match_channels`), or a
        DataError naming the sample."""
        try:
            img = self.load(i)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"unreadable image {self.describe(i)}: {e}") from e
        img = _as_hwc(img, self.describe(i))
        return img if channels is None else match_channels(img, channels)

    def images(self, rows: np.ndarray, channels: int | None = None) -> np.ndarray | None:
        """The uint8 images of ``rows`` as one B x H x W x C array (C made ``channels`` when given: grey
        repeated, or colour's first channel), or None when the source cannot give them at once (a folder,
        float pixels, odd shapes): then load them one by one with :meth:`image`, which names any problem."""
        if self.load_many is None or len(rows) == 0:
            return None
        try:
            arr = np.asarray(self.load_many(np.asarray(rows, np.int64)))
        except Exception as e:  # noqa: BLE001 - the one-by-one path reports it, naming the image
            log.debug("%s: no batch of %d images (%s); loading them one by one", self.spec, len(rows), e)
            return None
        if arr.ndim == 3:
            arr = arr[:, :, :, None]
        if (arr.dtype != np.uint8 or arr.ndim != 4 or len(arr) != len(rows) or arr.shape[3] not in (1, 3, 4)
                or arr.shape[1] < 1 or arr.shape[2] < 1):
            # The array's dtype or shape: true of every batch, so this source stops trying.
            log.debug("%s holds %s images of shape %s: loading them one by one", self.spec, arr.dtype,
                      arr.shape[1:])
            self.load_many = None
            return None
        arr = arr[:, :, :, :3]
        return np.ascontiguousarray(arr if channels is None else match_channels(arr, channels))


def match_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Images (... x C) with C made ``channels``: greyscale repeated to 3, or colour's first channel
    (a greyscale file in a colour folder, or the reverse)."""
    if img.shape[-1] == channels:
        return img
    return np.repeat(img[..., :1], 3, axis=-1) if channels == 3 else img[..., :1]


def _as_hwc(img: np.ndarray, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or img.shape[0] < 1 or img.shape[1] < 1:
        raise DataError(f"image {what} has shape {img.shape}; expected H x W, H x W x 1, 3 or 4")
    if img.shape[2] == 4:
        img = img[:, :, :3]
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and img.size and img.max() <= 1.0:
            img = img * 255.0
        img = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)
