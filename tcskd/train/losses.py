"""Loss pieces of TCS training, as pure functions of tensors.

``total = CE(logits, y) + lam * mimic(m * c_hat, m * c) + mu * eLSH(m * c_hat, m * c)``

- CE is averaged over the labelled samples of the batch (label >= 0); a batch
  without any labelled sample contributes 0. For segmentation the logits are
  B x C x H x W and the labels B x H x W: CE is averaged over the labelled
  pixels (the loop turns the masks' ignore value 255 into -1).
- ``mse`` / ``smooth-l1`` (beta 1) are averaged over the batch and the active
  coordinates only; ``cosine`` is ``1 - cos(m * c_hat, m * c)`` averaged over
  the batch.
- eLSH: fixed Gaussian hyperplanes ``W`` (bits x K) with bias
  ``b = -median(W (m * c))`` over the cached targets (:func:`elsh_params`:
  on a seeded sample of at most ``ELSH_SAMPLE`` target rows, bits in blocks,
  so memory does not grow with N x bits; the bias is fitted again whenever
  tailoring changes the mask ``m``); the loss is BCE-with-logits of
  ``W (m * c_hat) + b`` against the bits ``1[W (m * c) + b > 0]``, averaged
  over batch and bits.
- Dense mimic (``dense``): the predicted coordinate maps (B x K x h x w) are
  first aligned to the teacher's token grid by :func:`align_to_grid` (the one
  alignment: the student's own augmentation undone, then the map resized to the
  grid, ``area`` when the student map is finer, bilinear when coarser); the
  distance is then the same ``mimic`` kind per location (cosine over the K
  coordinates of a location), averaged over the valid locations and the active
  coordinates (:func:`dense_mimic_loss`). With global and dense targets
  (``--mimic-on both``) the total is ``CE + lam * (mimic + dense)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

MIMICS = ("mse", "smooth-l1", "cosine")


class LossParts(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor
    mimic: torch.Tensor
    elsh: torch.Tensor
    dense: torch.Tensor
    """The dense mimic term (0 without dense targets)."""


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows with ``labels >= 0`` (0 when there are none)."""
    keep = labels >= 0
    per = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return (per * keep).sum() / keep.sum().clamp(min=1)


def elementwise_distance(kind: str, pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The per-element distance of the ``mse`` and ``smooth-l1`` mimic losses (rows x K, not reduced)."""
    if kind == "mse":
        return (pred - tgt) ** 2
    if kind == "smooth-l1":
        return F.smooth_l1_loss(pred, tgt, reduction="none", beta=1.0)
    raise ValueError(f"unknown mimic loss '{kind}' (choose {', '.join(MIMICS)})")


def mimic_loss(c_hat: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, kind: str = "mse",
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Distance between predicted and target coordinates (rows x K) on the active coordinates, averaged over
    the rows, or over the rows weighted by ``weight`` (rows; e.g. 0/1 for the locations that count)."""
    if kind == "cosine":
        per_row = 1.0 - F.cosine_similarity(c_hat * mask, c * mask, dim=1, eps=1e-8)
        return per_row.mean() if weight is None else (per_row * weight).sum() / weight.sum().clamp(min=1)
    per = elementwise_distance(kind, c_hat, c)
    if weight is None:
        return (per * mask).sum() / (c.shape[0] * mask.sum().clamp(min=1))
    return ((per * mask).sum(1) * weight).sum() / (weight.sum().clamp(min=1) * mask.sum().clamp(min=1))


def align_to_grid(d_hat: torch.Tensor, grid: tuple[int, int], aug: torch.Tensor | None = None,
                  size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predicted coordinate maps B x K x h x w on the teacher's grid: (B x K x Gh x Gw, valid B x Gh x Gw or None).

    ``aug`` (B x 3: the student's own augmentation ``(dy, dx, flip)`` of an input of ``size`` px, the input's
    pixel (i, j) being pixel (i + dy, j + dx) of the view, then mirrored when flip) is undone first: the map is
    mirrored back and translated into the view's frame (bilinear, zeros outside), and a location is valid
    only when its whole cell lies inside the input the student saw. Then the map is resized to the grid:
    ``area`` (the mean over the cell) when it is finer than the grid, bilinear when coarser. Without ``aug``
    (or when it is all zeros) every location is valid (None).
    """
    gh, gw = int(grid[0]), int(grid[1])
    valid = None
    if aug is not None and bool(aug.any()):
        aug = aug.to(d_hat.device, torch.float32)
        flip = (aug[:, 2] >= 0.5).view(-1, 1, 1, 1)
        d_hat = torch.where(flip, d_hat.flip(-1), d_hat)
        theta = torch.zeros(len(aug), 2, 3, device=d_hat.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = -2.0 * aug[:, 1] / float(size)  # sample the input at u - d (normalised units)
        theta[:, 1, 2] = -2.0 * aug[:, 0] / float(size)
        where = F.affine_grid(theta, [len(aug), 1, *d_hat.shape[-2:]], align_corners=False)
        d_hat = F.grid_sample(d_hat, where.to(d_hat.dtype), mode="bilinear", padding_mode="zeros",
                              align_corners=False)
        ones = torch.ones(len(aug), 1, *d_hat.shape[-2:], device=d_hat.device)
        valid = F.grid_sample(ones, where, mode="bilinear", padding_mode="zeros", align_corners=False)
        valid = (_resize(valid, gh, gw)[:, 0] > 1.0 - 1e-4).float()
    return _resize(d_hat, gh, gw), valid


def _resize(x: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """``x`` (B x C x h x w) at gh x gw: area when finer (or equal), bilinear when coarser."""
    h, w = x.shape[-2:]
    if (h, w) == (gh, gw):
        return x
    if h >= gh and w >= gw:
        return F.interpolate(x, size=(gh, gw), mode="area")
    return F.interpolate(x, size=(gh, gw), mode="bilinear", align_corners=False)


def dense_mimic_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "mse",
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """The mimic distance per location between aligned predictions ``pred`` (B x K x Gh x Gw) and targets
    (B x T x K, T = Gh * Gw row-major), averaged over the ``valid`` locations (B x Gh x Gw; None: all) and
    the active coordinates."""
    k = pred.shape[1]
    rows = pred.permute(0, 2, 3, 1).reshape(-1, k)
    tgt = target.reshape(-1, k).to(rows.dtype)
    return mimic_loss(rows, tgt, mask, kind, None if valid is None else valid.reshape(-1).to(rows.dtype))


#: Target rows the eLSH medians are taken over (a seeded sample when there are more).
ELSH_SAMPLE = 65_536
#: Hyperplanes projected at once when the medians are taken (bounds the memory to sample x block).
ELSH_BLOCK = 256


def elsh_sample(targets: np.ndarray, seed: int, size: int = ELSH_SAMPLE) -> torch.Tensor:
    """A seeded sample of at most ``size`` rows of ``targets`` (any leading shape x K), as float32 M x K."""
    k = targets.shape[-1]
    flat = targets.reshape(-1, k)
    if len(flat) > size:
        rows = np.sort(np.random.default_rng([int(seed), 15_485_863]).choice(len(flat), size, replace=False))
        flat = flat[rows]
    return torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))


def elsh_bias(sample: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``b = -median(W (m * c))`` over the sample rows, ``ELSH_BLOCK`` hyperplanes at a time."""
    c = sample if mask is None else sample * mask.to(sample)
    return torch.cat([-(c @ w[i:i + ELSH_BLOCK].T.to(c)).median(dim=0).values
                      for i in range(0, len(w), ELSH_BLOCK)]).to(w)


def elsh_planes(bits: int, k: int, seed: int) -> torch.Tensor:
    """W (bits x K): the seeded Gaussian hyperplanes of the eLSH term."""
    return torch.randn(bits, k, generator=torch.Generator().manual_seed(int(seed) * 7919 + 17))


def elsh_params(targets: np.ndarray, bits: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W bits x K, b bits): seeded Gaussian hyperplanes, ``b = -median(W c)`` over (a sample of) ``targets``."""
    w = elsh_planes(bits, targets.shape[-1], seed)
    return w, elsh_bias(elsh_sample(targets, seed), w)


def elsh_loss(c_hat: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
              b: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits of the student's hash logits against the teacher's hash bits."""
    logits = (c_hat * mask) @ w.T + b
    bits = (((c * mask) @ w.T + b) > 0).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, bits)


def tcs_loss(logits: torch.Tensor, labels: torch.Tensor, c_hat: torch.Tensor | None, c: torch.Tensor | None,
             mask: torch.Tensor | None, lam: float, mimic: str = "mse",
             elsh: tuple[torch.Tensor, torch.Tensor] | None = None, elsh_weight: float = 0.0,
             d_hat: torch.Tensor | None = None, d: torch.Tensor | None = None,
             valid: torch.Tensor | None = None) -> LossParts:
    """All loss parts; ``c_hat``/``c`` None (method ce, or a dense-only head) leaves no global mimic term;
    ``d_hat`` (aligned, B x K x Gh x Gw) and ``d`` (B x T x K) add the dense one (``valid``: its locations)."""
    ce = ce_loss(logits.float(), labels)
    zero = ce.new_zeros(())
    dense = (dense_mimic_loss(d_hat.float(), d.float(), mask, mimic, valid)
             if d_hat is not None and d is not None and mask is not None else zero)
    if c_hat is None or c is None or mask is None:
        return LossParts(ce + lam * dense if d_hat is not None else ce, ce, zero, zero, dense)
    c_hat, c = c_hat.float(), c.float()
    mim = mimic_loss(c_hat, c, mask, mimic)
    lsh = elsh_loss(c_hat, c, mask, *elsh) if elsh is not None and elsh_weight else zero
    total = ce + lam * mim + elsh_weight * lsh
    return LossParts(total + lam * dense if d_hat is not None else total, ce, mim, lsh, dense)
