"""Tailoring: the coordinate-selection schedule and step."""

import numpy as np
import torch

from tcskd.train.head import TCSHead
from tcskd.train.selection import SelectionSchedule, apply_selection, select


def test_schedule_counts():
    s = SelectionSchedule(k=64, epochs=10, select_every=2, drop_frac=0.25, min_dim=20)
    # selections after epochs 2, 4, 6, 8 (1-based): 64 -> 48 -> 36 -> 27 -> 21 (floor 20 not hit yet)
    assert s.active_counts() == [64, 64, 48, 48, 36, 36, 27, 27, 21, 21]
    assert not s.selects_after(9)  # never after the last epoch


def test_schedule_min_dim_and_at_least_one():
    s = SelectionSchedule(k=10, epochs=8, select_every=1, drop_frac=0.01, min_dim=6)
    assert s.active_counts() == [10, 9, 8, 7, 6, 6, 6, 6]
    assert SelectionSchedule(k=4, epochs=3, select_every=1, drop_frac=0.5, min_dim=99).active_counts() == [4, 4, 4]


def test_schedule_off():
    assert SelectionSchedule(k=8, epochs=5, select_every=0).active_counts() == [8] * 5
    assert SelectionSchedule(k=8, epochs=5, select_every=1, drop_frac=0.0).active_counts() == [8] * 5


def test_select_keeps_most_important_active():
    imp = np.array([5.0, 1.0, 9.0, 0.5, 3.0, 100.0])
    mask = np.array([1, 1, 1, 1, 1, 0], np.float32)  # coordinate 5 is already dropped
    new = select(imp, mask, keep=3)
    assert new.tolist() == [1, 0, 1, 0, 1, 0]


def test_select_ties_drop_later_coordinates():
    new = select(np.zeros(5), np.ones(5), keep=2)
    assert new.tolist() == [1, 1, 0, 0, 0]


def test_apply_selection_on_head():
    head = TCSHead(feature_dim=4, num_classes=3, k=6)
    head.importance.copy_(torch.tensor([1.0, 6.0, 2.0, 5.0, 3.0, 4.0]))
    sched = SelectionSchedule(k=6, epochs=4, select_every=1, drop_frac=0.5, min_dim=2)
    assert apply_selection(head, sched, epoch=0)
    assert head.mask.tolist() == [0, 1, 0, 1, 0, 1]
    assert head.importance.sum().item() == 0.0
    assert not apply_selection(head, sched, epoch=3)


def test_step_importance_of_each_criterion():
    import pytest

    from tcskd.train.losses import tcs_loss
    from tcskd.train.selection import SELECT_BY, step_importance

    assert SELECT_BY == ("grad", "taylor", "error", "worst")
    g = torch.Generator().manual_seed(0)
    c = torch.randn(16, 4, generator=g)
    off = torch.tensor([0.1, 0.5, 0.3, 2.0])  # coordinate 3 is matched worst, coordinate 0 best
    c_hat = (c + off * torch.randn(16, 4, generator=g)).requires_grad_(True)
    mask = torch.ones(4, requires_grad=True)
    gate = torch.ones(4, requires_grad=True)
    logits = torch.zeros(16, 3, requires_grad=True)
    parts = tcs_loss(logits, torch.zeros(16, dtype=torch.long), c_hat * gate, c, mask, lam=10.0)
    parts.total.backward()
    err = ((c_hat.detach() - c) ** 2).sum(0)
    rel = err / (c ** 2).sum(0)  # error and worst: relative to the coordinate's energy in the batch (1 - R^2)
    assert torch.allclose(step_importance("error", gate.grad, mask.grad, c_hat, c), rel, rtol=1e-6)
    assert torch.allclose(step_importance("worst", gate.grad, mask.grad, c_hat, c), -rel, rtol=1e-6)
    assert rel.argmin() == 0 and rel.argmax() == 3
    assert torch.equal(step_importance("grad", gate.grad, mask.grad, c_hat, c), gate.grad.abs())
    taylor = step_importance("taylor", gate.grad, mask.grad, c_hat, c)
    assert torch.equal(taylor, -mask.grad)
    # mse on the active coordinates, averaged over them: switching coordinate j off changes the loss by about
    # lam * (mean error - error_j) / B (absolute errors), so the worst-matched coordinate has the lowest
    # taylor importance
    want = 10.0 * (err.mean() - err) / (16 * 4)
    assert torch.allclose(taylor, want, rtol=1e-4, atol=1e-6)
    assert taylor.argsort().tolist() == (-err).argsort().tolist() and taylor.argmin() == err.argmax() == 3
    with pytest.raises(ValueError, match="gate"):
        step_importance("grad", None, mask.grad, c_hat, c)
    with pytest.raises(ValueError, match="mask"):
        step_importance("taylor", gate.grad, None, c_hat, c)
    with pytest.raises(ValueError, match="unknown"):
        step_importance("random", gate.grad, mask.grad, c_hat, c)


def test_tailor_presets_follow_the_label_budget_and_explicit_options_win():
    from tcskd.train.config import FIXED, TAILORED, TrainConfig, default_dim, resolve_config

    every = resolve_config(TrainConfig(cache="c", tailor="auto"))
    few = resolve_config(TrainConfig(cache="c", tailor="auto", labels_per_class=10))
    for cfg, preset in ((every, TAILORED), (few, FIXED)):
        assert {k: getattr(cfg, k) for k in ("select_every", "drop_frac", "min_dim", "select_by", "classify_from")
                } == {k: v for k, v in preset.items() if k != "start_dim"}
        assert default_dim(cfg) == preset["start_dim"]
    assert every.select_every == 1 and every.classify_from == "coords" and few.select_every == 0
    assert resolve_config(TrainConfig(cache="c", tailor="on", labels_per_class=10)).select_every == 1
    assert resolve_config(TrainConfig(cache="c", tailor="off")).select_every == 0
    assert resolve_config(TrainConfig(cache="c", method="fitnet", tailor="auto")).select_every == 0
    # an explicit option overrides its part of the preset, and nothing else
    mixed = resolve_config(TrainConfig(cache="c", tailor="auto", select_by="grad", min_dim=32))
    assert (mixed.select_by, mixed.min_dim, mixed.select_every, mixed.classify_from) == ("grad", 32, 1, "coords")
    off = resolve_config(TrainConfig(cache="c", tailor="auto", select_every=0))
    assert off.select_every == 0 and default_dim(off) == FIXED["start_dim"]
