"""Segmentation metrics: a confusion matrix over labelled pixels, mean IoU and pixel accuracy.

The confusion matrix ``conf`` is C x C int64 with rows = true class and columns = predicted class;
pixels whose truth is ``ignore`` (255) or outside [0, C) are not counted. Metrics are computed from
the summed matrix, never averaged over batches or images (a batch's mIoU is not a dataset's):
accumulate with :class:`ConfusionMeter` (or by adding matrices) and call :func:`miou` once.

- ``miou(conf)``: the mean, over the classes present in the truth or in the prediction (row sum +
  column sum > 0), of IoU_c = TP_c / (TP_c + FP_c + FN_c). A class absent from both is left out
  rather than counted as 0 or 1; ``nan`` when no pixel was counted at all.
- ``pixel_accuracy(conf)``: correctly labelled pixels / counted pixels (``nan`` when none).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

IGNORE = 255

ArrayLike = np.ndarray | torch.Tensor


def confusion(pred: ArrayLike, truth: ArrayLike, num_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """The C x C int64 confusion matrix (rows = truth, columns = prediction) of class-id maps of one shape.

    ``pred`` and ``truth`` are numpy arrays or torch tensors (any device: counted there, returned as
    numpy). Pixels with ``truth == ignore`` or truth outside [0, C) are skipped; a prediction outside
    [0, C) on a counted pixel is a ValueError (it is a bug upstream, not data)."""
    if tuple(pred.shape) != tuple(truth.shape):
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(truth.shape)} differ in shape")
    c = int(num_classes)
    if c < 1:
        raise ValueError(f"num_classes must be >= 1, not {num_classes}")
    if isinstance(pred, torch.Tensor) or isinstance(truth, torch.Tensor):
        return _confusion_torch(torch.as_tensor(pred), torch.as_tensor(truth), c, ignore)
    t = np.asarray(truth).reshape(-1).astype(np.int64)
    p = np.asarray(pred).reshape(-1).astype(np.int64)
    keep = (t != ignore) & (t >= 0) & (t < c)
    t, p = t[keep], p[keep]
    if p.size and (p.min() < 0 or p.max() >= c):
        raise ValueError(f"prediction holds class {int(p.min() if p.min() < 0 else p.max())} outside [0, {c})")
    return np.bincount(t * c + p, minlength=c * c).reshape(c, c).astype(np.int64)


def _confusion_torch(pred: torch.Tensor, truth: torch.Tensor, c: int, ignore: int) -> np.ndarray:
    t = truth.reshape(-1).long()
    p = pred.to(t.device).reshape(-1).long()
    keep = (t != ignore) & (t >= 0) & (t < c)
    t, p = t[keep], p[keep]
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= c):
        raise ValueError(f"prediction holds class {int(p.min() if p.min() < 0 else p.max())} outside [0, {c})")
    counts = torch.bincount(t * c + p, minlength=c * c)
    return counts.reshape(c, c).cpu().numpy().astype(np.int64)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class (float64, length C); ``nan`` for a class absent from both truth and prediction."""
    conf = np.asarray(conf, np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def miou(conf: np.ndarray) -> float:
    """Mean IoU over the classes present in the truth or the prediction; ``nan`` when no pixel counted."""
    iou = iou_per_class(conf)
    present = ~np.isnan(iou)
    return float(iou[present].mean()) if present.any() else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
    """Correct pixels / counted pixels; ``nan`` when no pixel was counted."""
    conf = np.asarray(conf)
    total = conf.sum()
    return float(np.trace(conf) / total) if total > 0 else float("nan")


class ConfusionMeter:
    """Sums confusion matrices over batches (and, via :meth:`merge`, over processes):
    ``meter.update(pred, truth)`` per batch, then ``meter.miou()`` and ``meter.pixel_accuracy()``."""

    def __init__(self, num_classes: int, ignore: int = IGNORE) -> None:
        self.num_classes = int(num_classes)
        self.ignore = ignore
        self.conf = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, pred: ArrayLike, truth: ArrayLike) -> np.ndarray:
        """Count a batch; returns the batch's own matrix."""
        batch = confusion(pred, truth, self.num_classes, self.ignore)
        self.conf += batch
        return batch

    def merge(self, conf: np.ndarray) -> None:
        """Add another matrix (say, another rank's, after an all-reduce of the raw counts)."""
        self.conf += np.asarray(conf, np.int64)

    def reset(self) -> None:
        self.conf[:] = 0

    def miou(self) -> float:
        return miou(self.conf)

    def pixel_accuracy(self) -> float:
        return pixel_accuracy(self.conf)
