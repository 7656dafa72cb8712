"""Loss pieces of TCS training, as pure functions of tensors.

``total = CE(logits, y) + lam * mimic(m * c_hat, m * c) + mu * eLSH(m * c_hat, m * c)``

- CE is averaged over the labelled samples of the batch (label >= 0); a batch
  without any labelled sample contributes 0.
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


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows with ``labels >= 0`` (0 when there are none)."""
    keep = labels >= 0
    per = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return (per * keep).sum() / keep.sum().clamp(min=1)


def mimic_loss(c_hat: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Distance between predicted and target coordinates on the active coordinates."""
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(c_hat * mask, c * mask, dim=1, eps=1e-8)).mean()
    if kind == "mse":
        per = (c_hat - c) ** 2
    elif kind == "smooth-l1":
        per = F.smooth_l1_loss(c_hat, c, reduction="none", beta=1.0)
    else:
        raise ValueError(f"unknown mimic loss '{kind}' (choose {', '.join(MIMICS)})")
    return (per * mask).sum() / (c.shape[0] * mask.sum().clamp(min=1))


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
             elsh: tuple[torch.Tensor, torch.Tensor] | None = None, elsh_weight: float = 0.0) -> LossParts:
    """All loss parts; ``c_hat``/``c`` None (method ce) leaves only CE."""
    ce = ce_loss(logits.float(), labels)
    zero = ce.new_zeros(())
    if c_hat is None or c is None or mask is None:
        return LossParts(ce, ce, zero, zero)
    c_hat, c = c_hat.float(), c.float()
    mim = mimic_loss(c_hat, c, mask, mimic)
    lsh = elsh_loss(c_hat, c, mask, *elsh) if elsh is not None and elsh_weight else zero
    return LossParts(ce + lam * mim + elsh_weight * lsh, ce, mim, lsh)
