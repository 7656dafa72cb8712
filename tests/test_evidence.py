"""Checks that could fail: the eLSH term against a value worked out by hand, and the test split scored exactly
once per run, after training (counted by a spy, not inferred from a missing key)."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from _train_fixtures import make_npz, make_train_cache
from tcskd.train.losses import elsh_loss, tcs_loss

# Two rows, four coordinates, two fixed hyperplanes, the last coordinate switched off.
W = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
B = torch.tensor([0.5, -1.0])
MASK = torch.tensor([1.0, 1.0, 1.0, 0.0])
C = torch.tensor([[1.0, 2.0, 0.0, 5.0], [0.0, 0.0, 3.0, 1.0]])       # teacher
C_HAT = torch.tensor([[0.5, 0.0, 0.0, 9.0], [0.0, 1.0, 1.0, 2.0]])   # student

# By hand: m*c = [1,2,0,0], [0,0,3,0]; W(m*c) + b = [1+0.5, 2-1] = [1.5, 1] -> bits 1, 1 and [-3+0.5, 0-1] =
# [-2.5, -1] -> bits 0, 0. Student logits W(m*c_hat) + b: [0.5+0.5, 0-1] = [1, -1] and [-1+0.5, 1-1] = [-0.5, 0].
# BCE with logits z: bit 1 costs log(1 + e^-z), bit 0 costs log(1 + e^z); the mean over the 4 (row, bit) pairs:
ELSH_BY_HAND = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))
                + math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0))) / 4
# MSE over the batch and the 3 active coordinates: ((-0.5)^2 + (-2)^2 + 0^2 + 0^2 + 1^2 + (-2)^2) / 6.
MSE_BY_HAND = (0.25 + 4 + 0 + 0 + 1 + 4) / 6


def test_elsh_loss_equals_the_value_worked_out_by_hand():
    assert ELSH_BY_HAND == pytest.approx(0.6984375, abs=1e-6)  # the arithmetic above, as a number
    assert elsh_loss(C_HAT, C, MASK, W, B).item() == pytest.approx(ELSH_BY_HAND, rel=1e-6)
    # the switched-off coordinate changes nothing, in the student's or the teacher's row
    assert elsh_loss(C_HAT + torch.tensor([0, 0, 0, 100.0]), C - 7 * (1 - MASK), MASK, W, B).item() == (
        pytest.approx(ELSH_BY_HAND, rel=1e-6))


def test_total_loss_weights_the_elsh_term_by_mu():
    logits, unlabelled = torch.zeros(2, 3), torch.tensor([-1, -1])  # no label: CE contributes 0
    parts = tcs_loss(logits, unlabelled, C_HAT, C, MASK, lam=2.0, elsh=(W, B), elsh_weight=0.5)
    assert parts.mimic.item() == pytest.approx(MSE_BY_HAND, rel=1e-6)
    assert parts.elsh.item() == pytest.approx(ELSH_BY_HAND, rel=1e-6)
    assert parts.total.item() == pytest.approx(2.0 * MSE_BY_HAND + 0.5 * ELSH_BY_HAND, rel=1e-6)
    off = tcs_loss(logits, unlabelled, C_HAT, C, MASK, lam=2.0, elsh=(W, B), elsh_weight=0.0)
    assert off.elsh.item() == 0.0 and off.total.item() == pytest.approx(2.0 * MSE_BY_HAND, rel=1e-6)


def test_tcskd_train_scores_the_test_split_exactly_once_after_training(tmp_path, monkeypatch):
    """A spy on every embedding pass (the per-epoch validation in the loop, the final scores in evaluate) and on
    the metrics written after each epoch: the test split is embedded once, after the last epoch's row."""
    import tcskd.train.evaluate as evaluate
    import tcskd.train.loop as loop
    from tcskd.cli import main

    npz = make_npz(tmp_path / "d.npz", n_train=40, n_test=16)
    cache = make_train_cache(tmp_path, npz, coords=True)
    events: list[str] = []
    prep_seen = []
    real_inputs, real_append = loop.load_run_inputs, loop.append_metrics

    def inputs(cfg):
        prep_seen.append(real_inputs(cfg))
        return prep_seen[-1]

    def append(path, row):
        events.append(f"epoch {row['epoch']}")
        return real_append(path, row)

    def spy(real):
        def embed(student, head, ds, *args, **kw):
            prep = prep_seen[-1]
            events.append({id(prep.test_set): "test", id(prep.val_set): "val", id(prep.knn_set): "knn"}[id(ds)])
            return real(student, head, ds, *args, **kw)
        return embed

    monkeypatch.setattr(loop, "load_run_inputs", inputs)
    monkeypatch.setattr(loop, "append_metrics", append)
    monkeypatch.setattr(loop, "embed", spy(loop.embed))
    monkeypatch.setattr(evaluate, "embed", spy(evaluate.embed))
    r = CliRunner().invoke(main, ["train", "--cache", str(cache), "--epochs", "2", "--batch-size", "8",
                                  "--device", "cpu", "--workers", "0", "--tailor", "off", "--out",
                                  str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert prep_seen[-1].test_set is not None and len(prep_seen[-1].test_set) == 16
    # val after each epoch, then the final scores: val, test, the kNN references (once, reused for test)
    assert events == ["val", "epoch 1", "val", "epoch 2", "val", "knn", "test"]
    assert events.count("test") == 1
