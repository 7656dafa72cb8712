"""Tailoring: the selection schedule (warm-up included), the selection step, and each criterion's importance
checked against a computation of another kind (the real loss with a coordinate switched off, finite
differences of it, the error of the whole batch in one process)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tcskd.train.head import TCSHead
from tcskd.train.losses import elsh_bias, elsh_planes, tcs_loss
from tcskd.train.selection import (SELECT_BY, SelectionSchedule, ablation_deltas, apply_selection, combine,
                                   kept_ranks, select, step_importance, step_stats, warmup_steps_of)


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
    assert not SelectionSchedule(k=8, epochs=5, select_every=0).gathers(100)


def test_schedule_waits_for_the_warm_up():
    # 10 steps per epoch, warm-up 1.5 epochs = 15 steps: steps 0-14 add nothing; the step scheduled after
    # epoch 1 (steps 0-9, all warm-up) waits, the one after epoch 2 selects on steps 15-19.
    assert warmup_steps_of(1.5, 10) == 15 and warmup_steps_of(0.0, 10) == 0 and warmup_steps_of(1.0, 7) == 7
    s = SelectionSchedule(k=10, epochs=5, select_every=1, drop_frac=0.2, min_dim=2, warmup_steps=15,
                          steps_per_epoch=10)
    assert [s.gathers(t) for t in (0, 14, 15, 49)] == [False, False, True, True]
    assert [s.selects_after(e) for e in range(5)] == [False, True, True, True, False]
    assert s.active_counts() == [10, 10, 8, 7, 6]
    # warm-up of exactly one epoch: its selection waits; warm-up 0: the plain schedule
    one = SelectionSchedule(k=256, epochs=10, select_every=1, drop_frac=0.2, min_dim=64, warmup_steps=35,
                            steps_per_epoch=35)
    assert one.active_counts() == [256, 256, 205, 164, 132, 106, 85, 68, 64, 64]
    assert SelectionSchedule(k=256, epochs=10, select_every=1, drop_frac=0.2, min_dim=64,
                             steps_per_epoch=35).active_counts() == [256, 205, 164, 132, 106, 85, 68, 64, 64, 64]


def test_select_keeps_most_important_active():
    imp = np.array([5.0, 1.0, 9.0, 0.5, 3.0, 100.0])
    mask = np.array([1, 1, 1, 1, 1, 0], np.float32)  # coordinate 5 is already dropped
    new = select(imp, mask, keep=3)
    assert new.tolist() == [1, 0, 1, 0, 1, 0]
    assert kept_ranks(torch.from_numpy(new)) == [0, 2, 4]


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
    assert not head.gate.requires_grad and all(p is not head.gate for p in head.trainable_parameters())


def test_removed_grad_criterion_says_what_replaces_it():
    from tcskd.errors import TcskdError
    from tcskd.train.config import TrainConfig, resolve_config

    assert SELECT_BY == ("ablation", "ablation-ce", "taylor", "error", "worst")
    with pytest.raises(TcskdError, match="^--select-by grad was removed .*use ablation"):
        resolve_config(TrainConfig(cache="c", select_by="grad"))


# -- each criterion against another computation --------------------------------------------------------------

def _batch(classify_from: str, seed: int = 0, k: int = 5, b: int = 12):
    """A head on a fixed random batch: features, targets (coordinate 3 is far off), labels (two unlabelled),
    and a mask with coordinate 4 already dropped."""
    torch.manual_seed(seed)
    head = TCSHead(feature_dim=6, num_classes=3, k=k, classify_from=classify_from).double()
    f = torch.randn(b, 6, dtype=torch.float64)
    c = (head.project(f) + 0.3 * torch.randn(b, k, dtype=torch.float64)).detach()
    c[:, 3] += 2.0
    y = torch.randint(0, 3, (b,))
    y[:2] = -1
    mask = torch.ones(k, dtype=torch.float64)
    mask[4] = 0.0
    return head, f, c, y, mask


def _loss(head, f, c, y, mask, **kw) -> float:
    logits, c_hat = head(f, mask)
    return float(tcs_loss(logits, y, c_hat, c, mask, 10.0, **kw).total.detach())


CASES = [("coords", "mse", 0), ("feature", "mse", 0), ("coords", "smooth-l1", 0), ("coords", "cosine", 0),
         ("coords", "mse", 8), ("feature", "cosine", 8)]


@pytest.mark.parametrize("classify_from, mimic, bits", CASES)
def test_ablation_is_the_loss_change_of_switching_each_coordinate_off(classify_from, mimic, bits):
    head, f, c, y, mask = _batch(classify_from)
    kw = {"mimic": mimic}
    if bits:
        w = elsh_planes(bits, 5, seed=3).double()
        other = c[torch.randperm(len(c))[:7]] + 0.1  # not the batch: no row sits exactly on a hyperplane
        kw.update(elsh=(w, elsh_bias(other, w, mask)), elsh_weight=0.7)
    base = _loss(head, f, c, y, mask, **kw)
    want = []
    for j in range(5):  # the real forward pass and loss with coordinate j off, one at a time
        m = mask.clone()
        m[j] = 0.0
        want.append(_loss(head, f, c, y, m, **kw) - base if mask[j] else 0.0)
    with torch.no_grad():
        logits, c_hat = head(f, mask)
    got = ablation_deltas(logits, y, c_hat, c, mask, 10.0, mimic, kw.get("elsh"), kw.get("elsh_weight", 0.0),
                          head.classifier.weight if classify_from == "coords" else None)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert got[4] == 0.0 and got[3] < 0  # switching the far-off coordinate off lowers the loss
    assert step_importance("ablation", deltas=got).tolist() == got.float().tolist()


def test_ablation_ce_is_the_change_of_ce_alone():
    head, f, c, y, mask = _batch("coords", seed=3)
    with torch.no_grad():
        logits, c_hat = head(f, mask)
    got = ablation_deltas(logits, y, c_hat, None, mask, 0.0, classifier_weight=head.classifier.weight)

    def ce(m):
        return float(tcs_loss(head(f, m)[0], y, None, None, None, 10.0).ce.detach())

    want = [ce(mask * (torch.arange(5) != j)) - ce(mask) if mask[j] else 0.0 for j in range(5)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert (got != 0).sum() == 4
    # the classifier on the feature: CE does not see the mask
    feat, f, c, y, mask = _batch("feature", seed=3)
    with torch.no_grad():
        logits, c_hat = feat(f, mask)
    assert ablation_deltas(logits, y, c_hat, None, mask, 0.0).tolist() == [0.0] * 5


def test_ablation_of_the_dense_term_on_the_valid_locations():
    torch.manual_seed(1)
    pred = torch.randn(3, 4, 2, 2, dtype=torch.float64)  # aligned predictions, B x K x Gh x Gw
    d = torch.randn(3, 4, 4, dtype=torch.float64)        # targets, B x T x K
    valid = (torch.rand(3, 2, 2) > 0.3).double()
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    logits, y = torch.zeros(3, 2, dtype=torch.float64), torch.full((3,), -1)
    for mimic in ("mse", "cosine"):
        def loss(m):
            return float(tcs_loss(logits, y, None, None, m, 2.0, mimic, d_hat=pred, d=d, valid=valid).total)

        want = [loss(mask * (torch.arange(4) != j)) - loss(mask) for j in range(4)]
        got = ablation_deltas(logits, y, None, None, mask, 2.0, mimic, d_hat=pred, d=d, valid=valid)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)  # float32 inside


@pytest.mark.parametrize("classify_from", ["coords", "feature"])
def test_taylor_is_the_magnitude_of_the_finite_difference(classify_from):
    head, f, c, y, mask = _batch(classify_from)
    m = mask.clone().requires_grad_(True)
    logits, c_hat = head(f, m)
    tcs_loss(logits, y, c_hat, c, m, 10.0).total.backward()
    got = step_importance("taylor", mask_grad=m.grad)
    eps = 1e-3  # CE runs in float32 (its rounding / 2 eps stays under 1e-4); the central difference's error is eps^2
    for j in range(5):  # central difference of the loss in m_j (m_j = 1 -+ eps; a dropped one at 0 -+ eps)
        lo, hi = mask.clone(), mask.clone()
        lo[j] -= eps
        hi[j] += eps
        fd = (_loss(head, f, c, y, hi) - _loss(head, f, c, y, lo)) / (2 * eps)
        assert float(got[j]) == pytest.approx(abs(fd), rel=1e-4, abs=2e-4), j
    # per batch, then summed: two batches whose gradients cancel still add up
    assert torch.equal(combine("taylor", step_stats("taylor", mask_grad=-m.grad)), got.float())


def _error_by_hand(pred: torch.Tensor, c: torch.Tensor) -> list[float]:
    """1 - R^2 of each coordinate (uncentred), element by element."""
    out = []
    for j in range(c.shape[1]):
        num = sum((float(pred[b, j]) - float(c[b, j])) ** 2 for b in range(c.shape[0]))
        den = sum(float(c[b, j]) ** 2 for b in range(c.shape[0]))
        out.append(num / den)
    return out


@pytest.mark.parametrize("select_by", ["error", "worst"])
def test_error_split_over_ranks_is_one_ratio_over_all_rows(select_by):
    g = torch.Generator().manual_seed(0)
    c = torch.randn(16, 4, generator=g) * torch.tensor([3.0, 1.0, 0.2, 1.0])
    pred = c + torch.tensor([0.1, 0.5, 0.3, 2.0]) * torch.randn(16, 4, generator=g)
    one = step_importance(select_by, pred=pred, target=c)
    sign = 1.0 if select_by == "error" else -1.0
    np.testing.assert_allclose(one.numpy(), sign * np.array(_error_by_hand(pred, c)), rtol=1e-5)
    # two ranks of unequal shares (5 and 11 rows): their statistics summed (what the loop's all-reduce does),
    # then one ratio; the mean of the two ranks' own ratios is another number
    parts = [step_stats(select_by, 2, pred=pred[s], target=c[s]) for s in (slice(0, 5), slice(5, 16))]
    split = combine(select_by, parts[0] + parts[1])
    assert torch.allclose(split, one, rtol=1e-6, atol=0)
    mean_of_ratios = (combine(select_by, parts[0]) + combine(select_by, parts[1])) / 2
    assert not torch.allclose(mean_of_ratios, one, rtol=1e-2)
    assert one.argmax() == (0 if select_by == "worst" else 3) or one.argmin() == (3 if select_by == "worst" else 0)


def test_criteria_split_over_ranks_equal_one_process():
    # taylor and ablation: each rank's share is its gradient / loss change of its own mean loss over the world
    # size; with equal shares and every row labelled, summed they are the whole batch's
    head, f, c, y, mask = _batch("coords", seed=2, b=8)
    y = y.abs()
    stats = {"taylor": [], "ablation": []}
    for rows, world in ((slice(0, 8), 1), (slice(0, 4), 2), (slice(4, 8), 2)):
        m = mask.clone().requires_grad_(True)
        logits, c_hat = head(f[rows], m)
        tcs_loss(logits, y[rows], c_hat, c[rows], m, 10.0).total.backward()
        stats["taylor"].append(step_stats("taylor", world, mask_grad=m.grad))
        deltas = ablation_deltas(logits.detach(), y[rows], c_hat.detach(), c[rows], mask, 10.0,
                                 classifier_weight=head.classifier.weight)
        stats["ablation"].append(step_stats("ablation", world, deltas=deltas))
    for name, (one, a, b) in stats.items():
        assert torch.allclose(combine(name, a + b), combine(name, one), rtol=1e-6, atol=1e-7), name
        assert not torch.allclose(combine(name, 2 * a), combine(name, one), rtol=1e-2), name


def test_step_stats_names_what_is_missing():
    with pytest.raises(ValueError, match="mask's gradient"):
        step_stats("taylor")
    with pytest.raises(ValueError, match="loss changes"):
        step_stats("ablation")
    with pytest.raises(ValueError, match="predicted and target"):
        step_stats("error")
    with pytest.raises(ValueError, match="unknown"):
        step_stats("random")


def test_tailor_presets_follow_the_label_budget_and_explicit_options_win():
    from tcskd.train.config import FIXED, TAILORED, TrainConfig, default_dim, resolve_config

    every = resolve_config(TrainConfig(cache="c", tailor="on"))
    few = resolve_config(TrainConfig(cache="c", tailor="off", labels_per_class=10))
    for cfg, preset in ((every, TAILORED), (few, FIXED)):
        assert {k: getattr(cfg, k) for k in ("select_every", "drop_frac", "min_dim", "select_by", "classify_from")
                } == {k: v for k, v in preset.items() if k != "start_dim"}
        assert default_dim(cfg) == preset["start_dim"]
    assert every.select_every == 1 and every.classify_from == "coords" and every.select_by == "taylor"
    assert few.select_every == 0
    # auto is off at every label budget (what the built-in default's validation grid chose)
    for lpc in (None, 10):
        auto = resolve_config(TrainConfig(cache="c", tailor="auto", labels_per_class=lpc))
        assert (auto.select_every, auto.classify_from, default_dim(auto)) == (0, "feature", 64)
    assert TrainConfig().tailor == "auto"
    assert resolve_config(TrainConfig(cache="c", tailor="on", labels_per_class=10)).select_every == 1
    assert resolve_config(TrainConfig(cache="c", method="fitnet", tailor="on")).select_every == 1
    # an explicit option overrides its part of the preset, and nothing else
    mixed = resolve_config(TrainConfig(cache="c", tailor="on", select_by="ablation", min_dim=32))
    assert (mixed.select_by, mixed.min_dim, mixed.select_every, mixed.classify_from) == ("ablation", 32, 1, "coords")
    off = resolve_config(TrainConfig(cache="c", tailor="on", select_every=0))
    assert off.select_every == 0 and default_dim(off) == FIXED["start_dim"]
