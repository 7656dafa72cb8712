"""Segmentation metrics against a direct per-pixel reference and hand-made cases."""

import math

import numpy as np
import pytest
import torch

from tcskd.segmetrics import ConfusionMeter, confusion, iou_per_class, miou, pixel_accuracy


def _reference(pred, truth, c, ignore=255):
    """Pixel by pixel: the slow, obvious confusion matrix and the metrics from their definitions."""
    conf = np.zeros((c, c), np.int64)
    for p, t in zip(pred.reshape(-1).tolist(), truth.reshape(-1).tolist()):
        if t == ignore or not 0 <= t < c:
            continue
        conf[t, p] += 1
    ious = []
    for k in range(c):
        inter = int(((pred == k) & (truth == k)).sum())
        valid = (truth != ignore) & (truth >= 0) & (truth < c)
        union = int((((pred == k) & valid) | (truth == k)).sum())
        if union:
            ious.append(inter / union)
    return conf, (float(np.mean(ious)) if ious else math.nan), (np.trace(conf) / conf.sum() if conf.sum() else math.nan)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_and_metrics_match_the_reference_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    c = 5
    truth = rng.integers(0, c, (3, 17, 13)).astype(np.uint8)
    truth[rng.random(truth.shape) < 0.2] = 255
    truth[0, 0, :3] = 7  # outside [0, C): skipped like ignore
    pred = np.where(rng.random(truth.shape) < 0.6, np.minimum(truth, c - 1), rng.integers(0, c, truth.shape))
    pred = pred.astype(np.int64)
    pred[truth == 7] = 0
    ref_conf, ref_miou, ref_acc = _reference(pred, truth, c)
    conf = confusion(pred, truth, c)
    assert conf.dtype == np.int64 and conf.shape == (c, c)
    assert np.array_equal(conf, ref_conf)
    assert miou(conf) == pytest.approx(ref_miou, abs=1e-12)
    assert pixel_accuracy(conf) == pytest.approx(ref_acc, abs=1e-12)
    # torch inputs (either or both) give the same matrix
    assert np.array_equal(confusion(torch.from_numpy(pred), torch.from_numpy(truth), c), ref_conf)
    assert np.array_equal(confusion(torch.from_numpy(pred), truth, c), ref_conf)


def test_hand_made_case():
    truth = np.array([[0, 0, 1, 1],
                      [0, 255, 1, 2]], np.uint8)
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 2, 2]])
    conf = confusion(pred, truth, 3)
    assert conf.tolist() == [[2, 1, 0],   # truth 0: two right, one called 1
                             [0, 2, 1],   # truth 1: two right, one called 2
                             [0, 0, 1]]   # truth 2: right; the ignored pixel is not counted
    # IoU: class 0 = 2/3, class 1 = 2/(3+3-2) = 1/2, class 2 = 1/(1+2-1) = 1/2
    assert iou_per_class(conf).tolist() == pytest.approx([2 / 3, 1 / 2, 1 / 2])
    assert miou(conf) == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    assert pixel_accuracy(conf) == pytest.approx(5 / 7)


def test_miou_leaves_out_classes_absent_from_truth_and_prediction():
    truth = np.array([0, 0, 2, 2])
    pred = np.array([0, 0, 2, 1])
    conf = confusion(pred, truth, 4)  # class 3 absent everywhere; class 1 only predicted
    iou = iou_per_class(conf)
    assert math.isnan(iou[3]) and iou[1] == 0.0
    assert miou(conf) == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    empty = confusion(np.zeros(3, int), np.full(3, 255), 4)
    assert empty.sum() == 0 and math.isnan(miou(empty)) and math.isnan(pixel_accuracy(empty))


def test_meter_sums_batches_like_one_big_batch():
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 4, (6, 9, 9))
    truth[rng.random(truth.shape) < 0.1] = 255
    pred = rng.integers(0, 4, truth.shape)
    meter = ConfusionMeter(4)
    for i in range(0, 6, 2):
        meter.update(pred[i:i + 2], truth[i:i + 2])
    whole = confusion(pred, truth, 4)
    assert np.array_equal(meter.conf, whole)
    assert meter.miou() == miou(whole) and meter.pixel_accuracy() == pixel_accuracy(whole)
    # the mean of per-batch mIoUs is not the dataset's mIoU: the meter does not average batches
    per_batch = [miou(confusion(pred[i:i + 2], truth[i:i + 2], 4)) for i in range(0, 6, 2)]
    assert meter.miou() != pytest.approx(float(np.mean(per_batch)), abs=1e-9)
    meter.merge(whole)
    assert np.array_equal(meter.conf, 2 * whole)
    meter.reset()
    assert meter.conf.sum() == 0


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="shape"):
        confusion(np.zeros((2, 3), int), np.zeros((3, 2), int), 3)
    with pytest.raises(ValueError, match="outside"):
        confusion(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="outside"):
        confusion(torch.tensor([0, -1]), torch.tensor([0, 1]), 3)
    # a wrong prediction on an ignored pixel does not matter
    assert confusion(np.array([0, 9]), np.array([0, 255]), 3).sum() == 1
