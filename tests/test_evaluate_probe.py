"""The teacher's linear probe with its weight decay chosen on the validation rows (``probe_wd`` auto): the
choice is the best validation top-1 of probes fitted independently at each decay (ties: the larger decay),
the test split is scored once with the chosen probe only, no validation rows fall back to the stated default,
``tcskd eval`` records the choice in its JSON and ``tcskd report`` still reads it."""

from __future__ import annotations

import json
import logging

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tcskd.cli import main
from tcskd.errors import TcskdError
from tcskd.options import check_values, click_options, config_from_params
from tcskd.splits import Holdout, labelled_mask
from tcskd.train import evaluate as ev
from tcskd.train.config import EvalConfig
from tcskd.train.evaluate import PROBE_WD_DEFAULT, PROBE_WD_GRID, evaluate_teacher, linear_probe_eval, linear_probe_top1
from tcskd.train.report import load_teacher_eval, sweep_figure, teacher_lines, teacher_reference

from tests._stores import write_cache

EPOCHS = 30


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Matrices of a few dozen columns: one intra-op thread is fastest, and waits on no busy core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rows(y: np.ndarray, rng: np.random.Generator, d: int = 25, sep: float = 1.0) -> np.ndarray:
    """Gaussian rows with the class (0/1) in 2 of ``d`` dims (means -sep / +sep), noise elsewhere."""
    x = rng.normal(size=(len(y), d)).astype(np.float32)
    x[:, :2] += ((2 * y - 1) * sep)[:, None]
    return x


@pytest.fixture(scope="module")
def problem() -> dict[str, np.ndarray]:
    """30 training rows in 25 dims (a third of class 1): the probe can nearly interpolate them, so a tiny decay
    overfits the noise dims, and a large one leaves little but the bias (the majority class) - an interior
    decay is best on the balanced validation and test rows."""
    rng = np.random.default_rng(0)
    ty = np.array([1] * 10 + [0] * 20)
    tx = _rows(ty, rng)
    vy = np.arange(400) % 2
    vx = _rows(vy, rng)
    ey = np.arange(300) % 2
    ex = _rows(ey, rng)
    return {"tx": tx, "ty": ty, "vx": vx, "vy": vy, "ex": ex, "ey": ey}


@pytest.fixture(scope="module")
def reference(problem) -> list[float]:
    """Each grid decay's validation top-1, each probe fitted on its own (the public one-probe function)."""
    p = problem
    return [linear_probe_top1(p["tx"], p["ty"], p["vx"], p["vy"], epochs=EPOCHS, weight_decay=wd)
            for wd in PROBE_WD_GRID]


def test_auto_picks_the_best_validation_decay_and_scores_test_once(problem, reference, monkeypatch):
    p = problem
    calls: list[tuple[float, str, int]] = []
    real = ev.probe_top1

    def spy(probe, x, y, side="test"):
        calls.append((probe.weight_decay, side, len(x)))
        return real(probe, x, y, side)

    monkeypatch.setattr(ev, "probe_top1", spy)
    res = linear_probe_eval(p["tx"], p["ty"], p["vx"], p["vy"], p["ex"], p["ey"], "auto", epochs=EPOCHS)
    grid = list(PROBE_WD_GRID)
    assert res["probe_wd_grid"] == grid and res["probe_wd_source"] == "val"
    assert res["probe_wd_val_top1"] == reference  # the recorded list: probes fitted alone at each decay
    best = max(reference)
    chosen = max(wd for wd, v in zip(grid, reference) if v == best)  # ties: the larger decay
    assert res["probe_wd"] == chosen and res["val_linear_top1"] == best
    assert grid[0] < chosen < grid[-1]  # neither the tiny (overfits) nor the large (underfits) decay
    assert best > reference[grid.index(1e-3)]  # beats the former fixed decay on val (here strictly)
    # The test rows are scored exactly once, by the chosen probe; every candidate once on the validation rows.
    assert [c for c in calls if c[2] == len(p["ey"])] == [(chosen, "test", len(p["ey"]))]
    assert sorted(c[0] for c in calls if c[1] == "validation") == grid
    assert res["linear_top1"] == linear_probe_top1(p["tx"], p["ty"], p["ex"], p["ey"], epochs=EPOCHS,
                                                   weight_decay=chosen)


def test_ties_go_to_the_larger_decay(problem, monkeypatch):
    p = problem
    real = ev.probe_top1
    val = {1e-4: 0.9, 1e-2: 0.9}  # two equal bests; every other decay worse

    def fake(probe, x, y, side="test"):
        return val.get(probe.weight_decay, 0.1) if side == "validation" else real(probe, x, y, side)

    monkeypatch.setattr(ev, "probe_top1", fake)
    res = linear_probe_eval(p["tx"], p["ty"], p["vx"], p["vy"], p["ex"], p["ey"], "auto", epochs=5)
    assert res["probe_wd"] == 1e-2 and res["val_linear_top1"] == 0.9
    assert res["probe_wd_val_top1"] == [val.get(wd, 0.1) for wd in PROBE_WD_GRID]


def test_without_validation_rows_auto_uses_the_default(problem, caplog):
    p = problem
    no_val = np.full(len(p["vy"]), -1)
    with caplog.at_level(logging.WARNING, logger="tcskd.train.evaluate"):
        res = linear_probe_eval(p["tx"], p["ty"], p["vx"], no_val, p["ex"], p["ey"], "auto", epochs=EPOCHS)
    assert (res["probe_wd"], res["probe_wd_source"], res["probe_wd_grid"], res["probe_wd_val_top1"],
            res["val_linear_top1"]) == (PROBE_WD_DEFAULT, "default", [1e-3], [None], None)
    assert res["linear_top1"] == linear_probe_top1(p["tx"], p["ty"], p["ex"], p["ey"], epochs=EPOCHS,
                                                   weight_decay=1e-3)
    assert "no labelled validation rows" in caplog.text


def test_a_given_decay_is_used_as_it_is(problem, reference):
    p = problem
    res = linear_probe_eval(p["tx"], p["ty"], p["vx"], p["vy"], p["ex"], p["ey"], 1e-5, epochs=EPOCHS)
    assert (res["probe_wd"], res["probe_wd_source"], res["probe_wd_grid"]) == (1e-5, "given", [1e-5])
    assert res["probe_wd_val_top1"] == [reference[0]] and res["val_linear_top1"] == reference[0]


# -- the option ------------------------------------------------------------------

@pytest.mark.parametrize("value", ["auto", 0.0, 1e-3, 10])
def test_probe_wd_accepts_auto_or_a_number(value):
    EvalConfig(cache="a", test_cache="b", probe_wd=value).validate()


@pytest.mark.parametrize("value", ["best", "1e-3", -1e-3, float("nan"), float("inf"), True])
def test_probe_wd_refuses_anything_else_in_one_line(value):
    with pytest.raises(TcskdError, match=r"^--probe-wd must be auto or a finite number >= 0 \(got .*\)$"):
        EvalConfig(cache="a", test_cache="b", probe_wd=value).validate()


def test_probe_wd_from_a_file_and_the_command_line():
    # YAML 1.1 reads 1e-3 as a string: a number field takes it as a number; an int becomes a float.
    assert check_values(EvalConfig, {"probe_wd": "1e-3"}, "f.yaml") == {"probe_wd": 1e-3}
    assert check_values(EvalConfig, {"probe_wd": 1}, "f.yaml") == {"probe_wd": 1.0}
    assert check_values(EvalConfig, {"probe_wd": "auto"}, "f.yaml") == {"probe_wd": "auto"}
    with pytest.raises(TcskdError, match="key 'probe_wd' must be a number or a string"):
        check_values(EvalConfig, {"probe_wd": [1]}, "f.yaml")
    seen = []

    @click.command()
    @click_options(EvalConfig)
    def cmd(**params):
        seen.append(config_from_params(EvalConfig, params).probe_wd)

    for args, want in (([], "auto"), (["--probe-wd", "1e-3"], 1e-3), (["--probe-wd", "auto"], "auto")):
        assert CliRunner().invoke(cmd, ["--cache", "a", "--test-cache", "b", *args]).exit_code == 0
        assert seen[-1] == want


# -- tcskd eval: the JSON, and tcskd report reading it -------------------------------

def _caches(tmp, problem, val_x, val_y):
    """A train cache of the training rows then the validation candidates, and a test cache."""
    p = problem
    x = np.concatenate([p["tx"], val_x])
    y = np.concatenate([p["ty"], val_y])
    write_cache(tmp / "train", x[:, None], labels=y, num_classes=2)
    write_cache(tmp / "test", p["ex"][:, None], labels=p["ey"], num_classes=2)
    return x, y


def test_eval_json_records_the_choice_and_report_reads_it(tmp_path, problem):
    p = problem
    x, y = _caches(tmp_path, problem, p["vx"], p["vy"])
    out = tmp_path / "teacher-lpc5-s1.json"
    cfg = EvalConfig(cache=str(tmp_path / "train"), test_cache=str(tmp_path / "test"), device="cpu",
                     labels_per_class=5, seed=1, val_frac=0.2, probe_epochs=EPOCHS, out=str(out))
    res = evaluate_teacher(cfg)
    saved = json.loads(out.read_text())
    # The rows tcskd train would hold out and label, fitted and scored independently.
    si = np.arange(len(y))
    val = Holdout(0.2).mask(y, si)
    lab = labelled_mask(y, si, 5, 1, eligible=~val)
    ref = [linear_probe_top1(x[lab], y[lab], x[val], y[val], epochs=EPOCHS, weight_decay=wd, seed=1)
           for wd in PROBE_WD_GRID]
    chosen = max(wd for wd, v in zip(PROBE_WD_GRID, ref) if v == max(ref))
    assert (saved["probe_wd"], saved["probe_wd_source"], saved["probe_wd_val_top1"]) == (chosen, "val", ref)
    assert saved["probe_wd_grid"] == list(PROBE_WD_GRID) and saved["config"]["probe_wd"] == "auto"
    assert saved["linear_top1"] == linear_probe_top1(x[lab], y[lab], p["ex"], p["ey"], epochs=EPOCHS,
                                                     weight_decay=chosen, seed=1) == res["linear_top1"]
    assert (saved["train_rows"], saved["val_rows"], saved["labels_per_class"]) == (10, int(val.sum()), 5)
    # tcskd report: the keys it reads are there; the teacher's lines at the budget are this file's figures.
    e = load_teacher_eval(out)
    assert teacher_reference([e], 5) == {"knn_top1": 100 * e["knn_top1"], "linear_top1": 100 * e["linear_top1"]}
    assert f"linear probe val {100 * e['val_linear_top1']:.2f}" in teacher_lines([e])[0]
    runs = [{"method": m, "labels_per_class": n, "test_top1": 0.5 + 0.01 * n, "seed": 0}
            for m in ("ce", "tcs") for n in (1, 5)]
    fig = sweep_figure(runs, x="labels_per_class", series="method", teacher_eval=[e], split="test")
    probe_line = [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "teacher:linear_top1"]
    assert [list(probe_line[0].get_xdata()), list(probe_line[0].get_ydata())] == [[5.0], [100 * e["linear_top1"]]]


def test_eval_without_validation_rows_records_the_default(tmp_path, problem):
    _caches(tmp_path, problem, problem["vx"][:0], problem["vy"][:0])
    res = evaluate_teacher(EvalConfig(cache=str(tmp_path / "train"), test_cache=str(tmp_path / "test"), device="cpu",
                                      val_frac=0.0, probe_epochs=EPOCHS))
    p = problem
    assert (res["probe_wd"], res["probe_wd_source"], res["val_linear_top1"], res["val_rows"]) == (
        1e-3, "default", None, 0)
    assert res["linear_top1"] == linear_probe_top1(p["tx"], p["ty"], p["ex"], p["ey"], epochs=EPOCHS)


def test_eval_with_a_given_decay_and_without_a_probe(tmp_path, problem):
    _caches(tmp_path, problem, problem["vx"], problem["vy"])
    base = dict(cache=str(tmp_path / "train"), test_cache=str(tmp_path / "test"), device="cpu", probe_epochs=5)
    res = evaluate_teacher(EvalConfig(**base, probe_wd=0.5))
    assert (res["probe_wd"], res["probe_wd_source"], res["probe_wd_grid"]) == (0.5, "given", [0.5])
    res = evaluate_teacher(EvalConfig(**base, linear=False))
    assert (res["linear_top1"], res["val_linear_top1"], res["probe_wd"], res["probe_wd_grid"]) == (None, None, None, [])


# -- the validation rows are never labelled ---------------------------------------

@pytest.mark.parametrize("per_class", [1, 2, 5, 10])
def test_labelled_rows_never_overlap_the_validation_rows(per_class):
    # Classes of 1, 2, 3, 10 and 500 rows, as the budgets of the few-shot recipe meet them; every seed.
    sizes = [1, 2, 3, 10, 500]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    si = np.random.default_rng(3).permutation(len(labels)) * 7  # the sample_index values are not 0..N-1
    val = Holdout(val_frac=0.1).mask(labels, si)
    # A share of 0.1 rounds to 0 below 5 rows, 1 of 10 rows, 50 of 500; each class keeps a training row.
    assert [int(val[labels == c].sum()) for c in range(len(sizes))] == [0, 0, 0, 1, 50]
    for seed in range(10):
        lab = labelled_mask(labels, si, per_class, seed, eligible=~val)
        assert not (lab & val).any()
        assert [int(lab[labels == c].sum()) for c in range(len(sizes))] == [min(per_class, n - v) for n, v in
                                                                            zip(sizes, [0, 0, 0, 1, 50])]


def test_eval_command_says_which_decay_and_refuses_a_bad_one(tmp_path, problem):
    _caches(tmp_path, problem, problem["vx"], problem["vy"])
    args = ["eval", "--cache", str(tmp_path / "train"), "--test-cache", str(tmp_path / "test"), "--device", "cpu"]
    res = CliRunner().invoke(main, [*args, "--probe-wd", "0.5"])
    assert res.exit_code == 0, res.output
    assert "linear probe top-1 (wd 0.5, given)" in res.output
    res = CliRunner().invoke(main, [*args, "--probe-wd", "best", "--out", str(tmp_path / "e.json")])
    assert res.exit_code == 2 and not (tmp_path / "e.json").exists()
    assert res.output.strip().splitlines()[-1].endswith("--probe-wd must be auto or a finite number >= 0 (got 'best')")
