"""Views of an image: a crop box plus a horizontal flip, replayable at any resolution.

A view's parameters are five numbers ``(y0, x0, h, w, hflip)``: the crop box
normalised by the image's height and width, and 1.0 for a mirrored view.
View 0 is the deterministic centre crop (the largest centred square, i.e.
resize + centre crop). Views 1..K-1 are random-resized-crops with a random
flip, drawn from a generator seeded by ``(seed, sample_index, view)`` so that
they do not depend on batch order, chunking or the number of processes.
The student replays the very same box and flip on its own input.
A segmentation mask goes through the same box and flip (:func:`apply_mask_view`, nearest neighbour).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SCALE = (0.25, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)


def center_params(h: int, w: int) -> np.ndarray:
    s = min(h, w)
    return np.array([(h - s) / 2 / h, (w - s) / 2 / w, s / h, s / w, 0.0], np.float32)


def random_params(rng: np.random.Generator, h: int, w: int,
                  scale: tuple[float, float] = DEFAULT_SCALE,
                  ratio: tuple[float, float] = DEFAULT_RATIO) -> np.ndarray:
    """torchvision's RandomResizedCrop box (10 tries, then centre fallback) + a coin flip."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y0 = int(rng.integers(0, h - ch + 1))
            x0 = int(rng.integers(0, w - cw + 1))
            box = (y0, x0, ch, cw)
            break
    if box is None:
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif in_ratio > ratio[1]:
            ch, cw = h, int(round(h * ratio[1]))
        else:
            cw, ch = w, h
        box = ((h - ch) // 2, (w - cw) // 2, ch, cw)
    flip = float(rng.random() < 0.5)
    y0, x0, ch, cw = box
    return np.array([y0 / h, x0 / w, ch / h, cw / w, flip], np.float32)


def view_params(sample_index: int, h: int, w: int, views: int, seed: int,
                scale: tuple[float, float] = DEFAULT_SCALE) -> np.ndarray:
    """The V x 5 parameters of a sample's views."""
    out = np.empty((views, 5), np.float32)
    out[0] = center_params(h, w)
    for v in range(1, views):
        rng = np.random.default_rng([seed, int(sample_index), v])
        out[v] = random_params(rng, h, w, scale)
    return out


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 H x W x C -> float C x H x W in [0, 1]."""
    return torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255.0)


def teacher_views(img: np.ndarray, params: np.ndarray, size: int) -> torch.Tensor:
    """The teacher's input for each view of one image: uint8 V x C x S x S.

    Cropped and resized in uint8 (4-5x faster than float on the CPU, and a
    quarter of the bytes to collate, pin and copy); the teacher's device
    turns it into float (``Teacher.features`` takes [0, 1] floats).
    """
    t = torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1)
    return torch.stack([apply_view(t, p, size) for p in params])


def crop_box(params: np.ndarray | torch.Tensor | list[float], h: int, w: int) -> tuple[int, int, int, int]:
    """The pixel box ``(y0, x0, ch, cw)`` of a view's normalised box on an H x W image: the one rounding
    that :func:`apply_view` and :func:`apply_mask_view` share."""
    p = [float(v) for v in params]
    y0 = int(round(p[0] * h))
    x0 = int(round(p[1] * w))
    ch = max(1, int(round(p[2] * h)))
    cw = max(1, int(round(p[3] * w)))
    return min(y0, h - ch), min(x0, w - cw), ch, cw


def draft_reduction(params: np.ndarray, h: int, w: int, size: int, reductions: tuple[int, ...] = (8, 4, 2)) -> int:
    """The largest of ``reductions`` at which an H x W image decoded at ceil(H / r) x ceil(W / r) still has
    every view's crop box (``params``, V x 5, normalised; the pixel box as :func:`crop_box` rounds it on the
    reduced image) at least ``size`` px in both dimensions, so the resize to ``size`` stays a reduction; 1
    when none does. The views are the same boxes at any decoded size (they are normalised)."""
    for r in reductions:
        rh, rw = -(-h // r), -(-w // r)
        if all(min(crop_box(p, rh, rw)[2:]) >= size for p in params):
            return r
    return 1


def apply_view(img: torch.Tensor, params: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``img`` (C x H x W, or B x C x H x W sharing one box; float or uint8) to the normalised box,
    resize to ``size``, flip. Each image of a batch comes out exactly as it would alone."""
    p = [float(v) for v in params]
    y0, x0, ch, cw = crop_box(p, *img.shape[-2:])
    crop = img[..., y0:y0 + ch, x0:x0 + cw]
    if crop.shape[-2] != size or crop.shape[-1] != size:
        if crop.dtype == torch.uint8:
            import torchvision.transforms.v2.functional as TF

            crop = TF.resize(crop.contiguous(), [size, size], antialias=True)
        else:
            batch = crop if crop.ndim == 4 else crop[None]
            crop = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            crop = crop if img.ndim == 4 else crop[0]
    if p[4] >= 0.5:
        crop = crop.flip(-1)
    return crop


def apply_mask_view(mask: torch.Tensor, params: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """A segmentation mask (H x W, or B x H x W sharing one box; uint8 class ids, 255 = ignore) through the
    view's crop box and flip exactly as :func:`apply_view` takes its image (same box rounding), resized to
    ``size`` x ``size`` by nearest neighbour at pixel centres (``nearest-exact``), so that no new class id
    appears and mask pixel (i, j) is the class under the image pixel (i, j) of the view."""
    p = [float(v) for v in params]
    if mask.ndim not in (2, 3):
        raise ValueError(f"a mask is H x W or B x H x W, not {tuple(mask.shape)}")
    y0, x0, ch, cw = crop_box(p, *mask.shape[-2:])
    crop = mask[..., y0:y0 + ch, x0:x0 + cw]
    if crop.shape[-2] != size or crop.shape[-1] != size:
        batch = crop[:, None] if crop.ndim == 3 else crop[None, None]
        crop = F.interpolate(batch.contiguous(), size=(size, size), mode="nearest-exact")
        crop = crop[:, 0] if mask.ndim == 3 else crop[0, 0]
    if p[4] >= 0.5:
        crop = crop.flip(-1)
    return crop


def resize_on_device(device: torch.device) -> bool:
    """Whether batches of in-memory images travel at their own size and the teacher's device takes their
    centre view (:func:`center_view`): on a GPU, CPU workers resizing image by image would starve it."""
    return device.type == "cuda"


def center_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images (C x H x W or B x C x H x W) at ``size`` px: as they are when already that size, else view 0
    (the centre crop) resized, for batches whose crop and resize were left to the device. On the CPU this
    is exactly the workers' uint8 resize; on CUDA torchvision resizes uint8 in float and rounds, which can
    differ by one grey level."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return apply_view(x, center_params(*x.shape[-2:]), size)
