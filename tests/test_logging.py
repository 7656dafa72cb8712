"""``tcskd train --log``: TensorBoard mirrors metrics.jsonl and final.json; resume replaces the redone epochs;
a missing package is one line naming the extra, before training starts; logging changes no result."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from _train_fixtures import make_npz, make_train_cache
from tcskd.cli import main
from tcskd.errors import TcskdError
from tcskd.train.config import TrainConfig
from tcskd.train.logger import parse_backends, scalars
from tcskd.train.loop import train
from tcskd.results import without_timings

needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard is not installed (pip install 'tcskd[tensorboard]')")



@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("logging")
    npz = make_npz(root / "d.npz", n_train=40, n_test=16)
    return make_train_cache(root, npz, coords=True, name="log")


def _cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(cache=str(cache), epochs=2, batch_size=8, dim=6, out=str(out), device="cpu", workers=0,
                select_every=1, drop_frac=0.5, min_dim=3, warmup_epochs=0.0)  # selects after epoch 1
    base.update(kw)
    return TrainConfig(**base)


def _events(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_mirrors(run: Path) -> None:
    """Every number of metrics.jsonl at its epoch, once, and every number of final.json at the last epoch."""
    events, rows = _events(run), _rows(run)
    want: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in scalars(row).items():
            if key != "epoch":
                want.setdefault(f"epoch/{key}", []).append((row["epoch"], value))
    final = json.loads((run / "final.json").read_text())
    for key, value in scalars(final).items():
        want[f"final/{key}"] = [(rows[-1]["epoch"], value)]
    assert sorted(events) == sorted(want)
    for tag, points in want.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in points], tag
        assert [v for _, v in events[tag]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-9), tag


@needs_tensorboard
def test_tensorboard_mirrors_metrics_and_final_scores(cache, tmp_path):
    from tcskd.train.commands import train as train_cmd

    out = tmp_path / "run"
    res = CliRunner().invoke(train_cmd, ["--cache", str(cache), "--epochs", "2", "--batch-size", "8", "--dim", "6",
                                         "--select-every", "1", "--drop-frac", "0.5", "--min-dim", "3",
                                         "--warmup-epochs", "0", "--out", str(out), "--device", "cpu",
                                         "--workers", "0", "--log", "tensorboard"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert res.output.strip().splitlines()[-1] == str(out)  # the command's output is unchanged
    _assert_mirrors(out)
    tags = set(_events(out))
    for key in ("loss", "loss_ce", "loss_mimic", "lr", "active_coords", "val_top1", "train_img_per_s"):
        assert f"epoch/{key}" in tags, key
    assert {"final/val_top1", "final/test_top1", "final/knn_top1", "final/img_per_s"} <= tags
    assert _events(out)["epoch/active_coords"] == [(1, 6.0), (2, 3.0)]  # tailoring: 6 -> 3 coordinates


@needs_tensorboard
def test_logging_changes_no_result(cache, tmp_path):
    train(_cfg(cache, tmp_path / "plain"))
    train(_cfg(cache, tmp_path / "logged", log="tensorboard"))
    plain, logged = _rows(tmp_path / "plain"), _rows(tmp_path / "logged")
    assert [without_timings(r) for r in plain] == [without_timings(r) for r in logged]
    assert not (tmp_path / "plain" / "tb").exists()


@needs_tensorboard
def test_resume_replaces_the_epochs_it_redoes(cache, tmp_path):
    """A run killed after logging epoch 2 but before its checkpoint: the resumed run logs epoch 2 again and
    the stale value is purged, so each epoch has one value, the one in metrics.jsonl."""
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    stopped = train(_cfg(cache, out, log="tensorboard", stop_after=1))
    assert stopped["stopped_after"] == 1
    stale = SummaryWriter(str(out / "tb"))
    stale.add_scalar("epoch/loss", 999.0, 2)
    stale.close()
    train(_cfg(cache, out, log="tensorboard", resume=True))
    _assert_mirrors(out)
    assert 999.0 not in [v for _, v in _events(out)["epoch/loss"]]


@needs_tensorboard
def test_resume_may_turn_logging_on(cache, tmp_path):
    out = tmp_path / "run"
    train(_cfg(cache, out, stop_after=1))
    train(_cfg(cache, out, log="tensorboard", resume=True))
    assert [s for s, _ in _events(out)["epoch/loss"]] == [2]  # the epochs run with logging on


@pytest.mark.parametrize("spec, package", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                           ("tensorboard,wandb", "wandb")])
def test_a_missing_package_is_one_line_naming_the_extra(cache, tmp_path, monkeypatch, spec, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed (importlib.util.find_spec gives None)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--cache", str(cache), "--out", str(out), "--device", "cpu",
                                  "--log", spec], prog_name="tcskd")
    assert r.exit_code != 0
    assert r.stderr.splitlines() == [f"tcskd: error: --log {package} needs the {package} package: "
                                     f"pip install 'tcskd[{package}]'"], r.stderr
    assert not out.exists()  # refused before anything was written


def test_backend_names():
    assert parse_backends("none") == () and parse_backends(None) == ()
    assert parse_backends("tensorboard, wandb,tensorboard") == ("tensorboard", "wandb")
    with pytest.raises(TcskdError, match="unknown --log backend 'mlflow'"):
        parse_backends("mlflow")
    with pytest.raises(TcskdError, match="unknown --log backend"):
        TrainConfig(cache="x", log="tensorbord").validate()
    assert scalars({"a": 1, "b": None, "c": True, "d": "x", "e": float("nan"), "f": 0.5}) == {"a": 1.0, "f": 0.5}


class _FakeWandbRun:
    def __init__(self, **kw) -> None:
        self.init, self.logged, self.summary, self.finished = kw, [], {}, False

    def log(self, data: dict, step: int) -> None:
        self.logged.append((step, data))

    def finish(self) -> None:
        self.finished = True


def test_wandb_mirrors_metrics_offline(cache, tmp_path, monkeypatch):
    """The wandb backend against a stand-in module (the package is optional): an offline run in RUN_DIR/wandb,
    one log call per epoch with that epoch's numbers, final.json in the summary, the same id on resume."""
    import types

    runs: list[_FakeWandbRun] = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # "installed"
    fake.init = lambda **kw: runs.append(_FakeWandbRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    train(_cfg(cache, out, log="wandb", stop_after=1))
    train(_cfg(cache, out, log="wandb", resume=True))
    assert len(runs) == 2 and all(r.finished for r in runs)
    assert runs[0].init["mode"] == "offline" and runs[0].init["dir"] == str(out / "wandb")
    assert runs[0].init["id"] == runs[1].init["id"] == (out / "wandb-id").read_text().strip()
    assert runs[0].init["config"]["log"] == "wandb" and runs[1].init["resume"] == "allow"
    logged = runs[0].logged + runs[1].logged
    rows = _rows(out)
    assert [step for step, _ in logged] == [r["epoch"] for r in rows] == [1, 2]
    for (_, data), row in zip(logged, rows):
        assert data == {f"epoch/{k}": v for k, v in scalars(row).items() if k != "epoch"}
    final = json.loads((out / "final.json").read_text())
    assert runs[1].summary == {f"final/{k}": v for k, v in scalars(final).items()}
