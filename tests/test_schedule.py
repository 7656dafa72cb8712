"""The multistep learning-rate schedule: ``lr_at`` around its milestones, the options that set it, and the
learning rates a run logs with it; the default (cosine) unchanged."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from _train_fixtures import make_npz, make_train_cache
from tcskd.errors import TcskdError
from tcskd.train.checkpoint import CHECKPOINT
from tcskd.train.commands import train as train_cmd
from tcskd.train.config import TrainConfig, resolve_config
from tcskd.train.loop import lr_at, train


def test_multistep_at_and_around_its_milestones():
    # 10 steps per epoch, milestones at epochs 3 and 6 = steps 30 and 60, no warm-up
    ms = (30, 60)
    lrs = {s: lr_at(s, 100, 0, 0.05, "multistep", ms, 0.1) for s in (0, 29, 30, 31, 59, 60, 61, 99)}
    assert lrs == pytest.approx({0: 0.05, 29: 0.05, 30: 0.005, 31: 0.005, 59: 0.005, 60: 0.0005, 61: 0.0005,
                                 99: 0.0005})
    assert lr_at(45, 100, 0, 1.0, "multistep", ms, 0.5) == 0.5
    assert lr_at(99, 100, 0, 1.0, "multistep", (10, 20, 30), 0.2) == pytest.approx(0.2 ** 3)


def test_multistep_warms_up_as_the_others():
    for s in range(10):
        assert lr_at(s, 100, 10, 1.0, "multistep", (50,), 0.1) == lr_at(s, 100, 10, 1.0) == pytest.approx((s + 1) / 10)
    assert lr_at(10, 100, 10, 1.0, "multistep", (50,), 0.1) == 1.0
    assert lr_at(50, 100, 10, 1.0, "multistep", (50,), 0.1) == pytest.approx(0.1)


def test_cosine_is_unchanged_by_the_multistep_arguments():
    for s in (0, 5, 10, 37, 99):
        expect = 1.0 * (s + 1) / 10 if s < 10 else 0.5 * (1.0 + math.cos(math.pi * (s - 10) / 90))
        assert lr_at(s, 100, 10, 1.0) == expect
        assert lr_at(s, 100, 10, 1.0, "cosine", (20, 40), 0.5) == expect


@pytest.mark.parametrize("kw, message", [
    (dict(schedule="multistep"), "--schedule multistep needs --milestones"),
    (dict(schedule="multistep", milestones=(5, 3)), "--milestones must be increasing (got 5,3)"),
    (dict(schedule="multistep", milestones=(3, 3)), "--milestones must be increasing"),
    (dict(schedule="multistep", milestones=(0, 3)), "--milestones must be epochs >= 1 (got 0,3)"),
    (dict(schedule="multistep", milestones=(3,), gamma=0.0), "--gamma must be in (0, 1] (got 0.0)"),
    (dict(schedule="multistep", milestones=(3,), gamma=1.5), "--gamma must be in (0, 1]"),
    (dict(milestones=(3,)), "--milestones is for --schedule multistep (the schedule is cosine)"),
])
def test_multistep_options_are_checked(kw, message):
    with pytest.raises(TcskdError) as e:
        TrainConfig(cache="c", epochs=10, **kw).validate()
    assert message in str(e.value)


def test_milestones_past_the_last_epoch_change_nothing_and_say_so(caplog):
    # As torch's MultiStepLR: a shortened run (e.g. --set train.epochs=1 on a 240-epoch recipe) still runs.
    cfg = resolve_config(TrainConfig(cache="c", epochs=1, schedule="multistep", milestones=(150, 180, 210)))
    assert cfg.milestones == (150, 180, 210) and "150,180,210 lie at or past the run's 1 epochs" in caplog.text
    assert [lr_at(s, 10, 0, 0.1, "multistep", (1500, 1800, 2100)) for s in (0, 9)] == [0.1, 0.1]


def test_milestones_become_a_tuple():
    cfg = resolve_config(TrainConfig(cache="c", epochs=10, schedule="multistep", milestones=[3, 6]))
    assert cfg.milestones == (3, 6) and cfg.gamma == 0.1
    assert TrainConfig().milestones == () and TrainConfig().schedule == "cosine"


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_multistep_run_logs_its_learning_rates(tmp_path):
    npz = make_npz(tmp_path / "d.npz", n_train=40, n_test=16)
    cache = make_train_cache(tmp_path, npz, name="multistep")
    run = tmp_path / "run"
    # 36 training rows, batch 8 (the last partial batch dropped): 4 steps per epoch; warm-up 1 epoch, then
    # x0.5 at epochs 1 and 2. Stopped after 2 epochs, then resumed with --resume --out only: the schedule
    # comes back from config.yaml (milestones a YAML list there).
    res = CliRunner().invoke(train_cmd, [
        "--cache", str(cache), "--epochs", "3", "--batch-size", "8", "--lr", "0.08", "--device", "cpu",
        "--schedule", "multistep", "--milestones", "1,2", "--gamma", "0.5", "--out", str(run), "--stop-after", "2"])
    assert res.exit_code == 0, res.output
    saved = (run / "config.yaml").read_text()
    assert "schedule: multistep" in saved and "milestones:\n- 1\n- 2\n" in saved and "gamma: 0.5" in saved
    again = CliRunner().invoke(train_cmd, ["--out", str(run), "--resume", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    rows = _rows(run)
    assert [r["steps"] for r in rows] == [4, 4, 4]
    assert [r["lr"] for r in rows] == pytest.approx([0.08, 0.04, 0.02])
    assert json.loads((run / "final.json").read_text())["epochs"] == 3


def test_bad_milestones_on_the_command_line(tmp_path):
    res = CliRunner().invoke(train_cmd, ["--cache", "x", "--milestones", "3,a"])
    assert res.exit_code == 2 and "is not a comma-separated list of int" in res.output


def test_a_cosine_run_logs_what_it_did_before(tmp_path):
    """The default schedule: lr of the last step of each epoch, as before multistep existed."""
    npz = make_npz(tmp_path / "d.npz", n_train=40, n_test=16)
    cache = make_train_cache(tmp_path, npz, name="cosine")
    train(TrainConfig(cache=str(cache), epochs=3, batch_size=8, lr=0.08, device="cpu", out=str(tmp_path / "r")))
    rows = _rows(tmp_path / "r")
    assert [r["steps"] for r in rows] == [4, 4, 4]
    assert [r["lr"] for r in rows] == [lr_at(s, 12, 4, 0.08) for s in (3, 7, 11)]


def test_a_checkpoint_without_the_multistep_options_resumes(tmp_path):
    """A run stopped by an older tcskd (its checkpoint's config lacks milestones and gamma) still resumes."""
    import torch

    npz = make_npz(tmp_path / "d.npz", n_train=40, n_test=16)
    cache = make_train_cache(tmp_path, npz, name="old")
    cfg = dict(cache=str(cache), epochs=2, batch_size=8, device="cpu", out=str(tmp_path / "r"))
    assert train(TrainConfig(**cfg, stop_after=1))["stopped_after"] == 1
    ck = torch.load(tmp_path / "r" / CHECKPOINT, weights_only=True)
    del ck["config"]["milestones"], ck["config"]["gamma"]
    torch.save(ck, tmp_path / "r" / CHECKPOINT)
    assert train(TrainConfig(**cfg, resume=True))["epochs"] == 2
