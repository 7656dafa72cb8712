"""Segmentation scores of a saved run recomputed in numpy: a confusion matrix built pixel by pixel from the
saved model's predictions, then IoU per class and pixel accuracy from their definitions (not tcskd.segmetrics)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IGNORE = 255


def predictions_and_masks(run_dir: Path, ds) -> tuple[np.ndarray, np.ndarray]:
    """(argmax class maps N x S x S, masks N x S x S) of the saved model of ``run_dir`` on every image of ``ds``."""
    from tcskd.train.data import eval_loader
    from tcskd.train.export import load_run

    student, head, _ = load_run(run_dir)
    student.eval()
    head.eval()
    preds, masks = [], []
    with torch.no_grad():
        for batch in eval_loader(ds, 64, 0, torch.device("cpu")):
            logits = head.segment(student.feature_map(batch.x), tuple(batch.x.shape[-2:]))
            preds.append(logits.argmax(1).numpy())
            masks.append(batch.mask.numpy())
    return np.concatenate(preds), np.concatenate(masks)


def scores_by_hand(pred: np.ndarray, truth: np.ndarray, classes: int) -> tuple[float, float]:
    """(mean IoU over the classes present in the truth or the prediction, pixel accuracy) of the pixels whose
    truth is not ``IGNORE``."""
    conf = np.zeros((classes, classes), np.int64)
    for p, t in zip(pred.ravel(), truth.ravel()):
        if t != IGNORE:
            conf[int(t), int(p)] += 1
    ious = []
    for c in range(classes):
        union = conf[c, :].sum() + conf[:, c].sum() - conf[c, c]
        if union:
            ious.append(conf[c, c] / union)
    return float(np.mean(ious)), float(np.trace(conf) / conf.sum())
