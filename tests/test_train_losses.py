"""Loss pieces on hand-computed tensors."""

import math

import numpy as np
import pytest
import torch

from tcskd.train.losses import ce_loss, elsh_loss, elsh_params, mimic_loss, tcs_loss


def test_ce_ignores_unlabelled_rows():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, -5.0]])
    labels = torch.tensor([0, 1, -1])
    # rows 0 and 1: -log(1/2) and -log(e^0 / (e^2 + e^0))
    want = (math.log(2) + math.log(math.exp(2) + 1)) / 2
    assert ce_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)


def test_ce_without_labels_is_zero():
    assert ce_loss(torch.randn(3, 4), torch.tensor([-1, -1, -1])).item() == 0.0


def test_mse_averages_over_active_coordinates_only():
    c_hat = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    c = torch.tensor([[0.0, 0.0, 100.0], [1.0, 1.0, -7.0]])
    mask = torch.tensor([1.0, 1.0, 0.0])
    # squared errors on coords 0, 1: 1 + 4 + 1 + 1 = 7, over 2 rows x 2 active coords
    assert mimic_loss(c_hat, c, mask, "mse").item() == pytest.approx(7 / 4)


def test_smooth_l1():
    c_hat = torch.tensor([[0.5, 3.0]])
    c = torch.tensor([[0.0, 0.0]])
    mask = torch.ones(2)
    # 0.5 * 0.5^2 = 0.125 (quadratic zone), 3 - 0.5 = 2.5 (linear zone)
    assert mimic_loss(c_hat, c, mask, "smooth-l1").item() == pytest.approx((0.125 + 2.5) / 2)


def test_cosine_uses_masked_vectors():
    c_hat = torch.tensor([[1.0, 0.0, 9.0], [1.0, 1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0, -9.0], [1.0, -1.0, 0.0]])
    mask = torch.tensor([1.0, 1.0, 0.0])
    # row 0: identical after masking -> 0; row 1: orthogonal -> 1
    assert mimic_loss(c_hat, c, mask, "cosine").item() == pytest.approx(0.5, abs=1e-6)


def test_unknown_mimic():
    with pytest.raises(ValueError):
        mimic_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(2), "l3")


def test_elsh_params_bias_is_minus_median():
    targets = np.random.default_rng(0).normal(size=(101, 4)).astype(np.float32)
    w, b = elsh_params(targets, bits=6, seed=3)
    assert w.shape == (6, 4) and b.shape == (6,)
    proj = torch.from_numpy(targets) @ w.T
    assert torch.allclose(b, -proj.median(0).values)
    # half the targets fall on each side of each hyperplane
    assert ((proj + b) > 0).float().mean(0).sub(0.5).abs().max() <= 1 / 101 + 1e-6
    w2, _ = elsh_params(targets, bits=6, seed=3)
    assert torch.equal(w, w2)


def test_elsh_loss_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([0.0, -1.0])
    c = torch.tensor([[2.0, 0.0]])        # W c + b = [2, -1] -> bits [1, 0]
    c_hat = torch.tensor([[0.0, 1.0]])    # logits [0, 0]
    mask = torch.ones(2)
    assert elsh_loss(c_hat, c, mask, w, b).item() == pytest.approx(math.log(2))
    # masking coordinate 0 of both: target logits [0, -1] -> bits [0, 0]; student logits [0, 0]
    assert elsh_loss(c_hat, c, torch.tensor([0.0, 1.0]), w, b).item() == pytest.approx(math.log(2))


def test_tcs_loss_combines_the_parts():
    logits = torch.tensor([[1.0, 0.0]])
    labels = torch.tensor([0])
    c_hat = torch.tensor([[1.0, 1.0]])
    c = torch.tensor([[0.0, 3.0]])
    mask = torch.ones(2)
    w, b = torch.eye(2), torch.zeros(2)
    parts = tcs_loss(logits, labels, c_hat, c, mask, lam=2.0, mimic="mse", elsh=(w, b), elsh_weight=0.5)
    ce = math.log(1 + math.exp(-1))
    assert parts.ce.item() == pytest.approx(ce, rel=1e-6)
    assert parts.mimic.item() == pytest.approx((1 + 4) / 2)
    assert parts.total.item() == pytest.approx(ce + 2.0 * 2.5 + 0.5 * parts.elsh.item(), rel=1e-6)
    only_ce = tcs_loss(logits, labels, None, None, None, lam=0.0)
    assert only_ce.total.item() == pytest.approx(ce, rel=1e-6) and only_ce.mimic.item() == 0.0
