"""Config files: ``--config FILE.yaml`` on every stage command (command line > file > defaults), a run's own
config.yaml reproduces the run, ``--resume`` is the same mechanism through the API and the CLI, and bad
files are refused with one line naming the key and the file before any stage runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from _train_fixtures import make_npz, make_train_cache
from tcskd.cli import main
from tcskd.errors import TcskdError
from tcskd.options import click_options, config_from_file, config_from_params, opt, read_config_file
from tcskd.train.config import TrainConfig, with_saved_config
from tcskd.train.loop import train
from tcskd.results import TIMING_KEYS

#: final.json keys that depend on the clock, the memory or the folder, not on what was learned.
_VOLATILE = ("run_dir", "timings", "created", *TIMING_KEYS)
_VOLATILE_SUFFIXES = ("_seconds", "_bytes", "_mb")


@dataclass
class _Toy:
    name: str = opt(help="Required.")
    count: int = opt(3)
    kind: str = opt("a", choices=("a", "b"))
    scale: float | None = opt(None)
    box: tuple[float, float] = opt((0.25, 1.0))
    steps: tuple[int, ...] = opt(())
    fast: bool = opt(False)
    internal: int = opt(7, cli=False)


def _toy(args: list[str]):
    seen = {}

    @click.command()
    @click_options(_Toy)
    def cmd(**params):
        seen["cfg"] = config_from_params(_Toy, params)

    res = CliRunner().invoke(cmd, args)
    return res, seen.get("cfg")


def _write(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_command_line_beats_the_file_beats_the_defaults(tmp_path):
    f = _write(tmp_path / "c.yaml", {"name": "from-file", "count": 5, "kind": "b", "box": [0.5, 0.75],
                                     "steps": [3, 6], "internal": 9})
    res, cfg = _toy(["--config", f])
    assert res.exit_code == 0, res.output
    assert cfg == _Toy(name="from-file", count=5, kind="b", box=(0.5, 0.75), steps=(3, 6), internal=9)
    # given on the command line wins, even when it equals the default; the rest comes from the file
    res, cfg = _toy(["--config", f, "--kind", "a", "--name", "cli", "--steps", "1,2"])
    assert res.exit_code == 0, res.output
    assert cfg == _Toy(name="cli", count=5, kind="a", box=(0.5, 0.75), steps=(1, 2), internal=9)
    # a required option may come from the file; neither: the usual usage error
    res, _ = _toy([])
    assert res.exit_code == 2 and "Missing option '--name'" in res.output
    res, _ = _toy(["--config", _write(tmp_path / "e.yaml", {"count": 1})])
    assert res.exit_code != 0 and "missing key 'name' (or give --name)" in str(res.exception)


def test_every_stage_command_takes_config():
    for cmd in ("cache", "basis", "train", "eval"):
        res = CliRunner().invoke(main, [cmd, "--help"])
        assert "--config FILE" in res.output, cmd


BAD_FILES = [
    ({"count": 1, "nmae": "x"}, "unknown key 'nmae' (_Toy has no such field"),
    ({"name": "x", "count": "many"}, "key 'count' must be an integer (got str 'many')"),
    ({"name": "x", "count": 1.5}, "key 'count' must be an integer (got float 1.5)"),
    ({"name": "x", "count": True}, "key 'count' must be an integer (got bool True)"),
    ({"name": "x", "fast": "yes"}, "key 'fast' must be true or false (got str 'yes')"),
    ({"name": "x", "box": [1.0]}, "key 'box' must be a list of 2 (float, float) (got list [1.0])"),
    ({"name": "x", "scale": [1]}, "key 'scale' must be a number or null (got list [1])"),
    ({"name": None}, "key 'name' must be a string (got NoneType None)"),
    ("- a\n- b\n", "expected a mapping of option names to values, got list"),
    ("name: [unclosed\n", "not valid YAML"),
]


@pytest.mark.parametrize("content, message", BAD_FILES, ids=[m.split(" (")[0] for _, m in BAD_FILES])
def test_bad_files_are_named_in_one_line(tmp_path, content, message):
    f = _write(tmp_path / "bad.yaml", content)
    with pytest.raises(TcskdError) as e:
        read_config_file(_Toy, f)
    assert str(e.value).startswith(f"{f}: {message}") and "\n" not in str(e.value)


def test_yaml_scalars_are_read_as_the_annotation_says(tmp_path):
    f = _write(tmp_path / "ok.yaml", "name: x\nscale: 5e-4\ncount: 2\nsteps: 150,180\n")
    assert read_config_file(_Toy, f) == {"name": "x", "scale": 5e-4, "count": 2, "steps": (150, 180)}


@pytest.mark.parametrize("cmd", ["cache", "basis", "train", "eval"])
def test_cli_refuses_a_bad_file_before_the_stage_runs(tmp_path, cmd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = _write(tmp_path / "bad.yaml", {"x": 1})
    res = CliRunner().invoke(main, [cmd, "--config", f, "--cache-root", str(tmp_path / "caches")])
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tcskd: error: {f}: unknown key 'x'"), res.output
    missing = str(tmp_path / "nope.yaml")
    res = CliRunner().invoke(main, [cmd, "--config", missing])
    assert res.exit_code != 0 and res.output.strip() == f"tcskd: error: {missing}: no such file"
    assert not (tmp_path / "caches").exists() and not (tmp_path / "runs").exists()


def test_a_value_outside_the_choices_is_refused_naming_the_file(tmp_path):
    f = _write(tmp_path / "c.yaml", {"cache": "c", "method": "tcss"})
    with pytest.raises(TcskdError, match=r"c.yaml: key 'method' must be one of tcs, fitnet, ce, online \(got 'tcss'\)"):
        read_config_file(TrainConfig, f)


# -- a run's config.yaml ------------------------------------------------------------

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cfg-data")
    npz = make_npz(root / "d.npz", n_train=48, n_test=16)
    return make_train_cache(root, npz, name="cfg")


def _metrics(run: Path) -> dict:
    final = json.loads((run / "final.json").read_text())
    return {k: v for k, v in final.items() if k not in _VOLATILE and not k.endswith(_VOLATILE_SUFFIXES)}


def _cli(args: list[str]) -> None:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)


def test_a_runs_config_yaml_reproduces_the_run(cache, tmp_path):
    first = tmp_path / "first"
    train(TrainConfig(cache=str(cache), epochs=2, batch_size=8, dim=4, lam=3.0, seed=5, out=str(first),
                      device="cpu", workers=0, labels_per_class=6, select_every=1, drop_frac=0.25, min_dim=2))
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert "resolved" in saved  # the extra record is allowed in a --config file
    again = tmp_path / "again"
    _cli(["train", "--config", str(first / "config.yaml"), "--out", str(again)])
    a, b = _metrics(first), _metrics(again)
    assert a == b and a["val_top1"] is not None and a["seed"] == 5
    cfg = config_from_file(TrainConfig, first / "config.yaml", out=str(tmp_path / "api"))  # the same from Python
    train(cfg)
    assert _metrics(tmp_path / "api") == a


def test_resume_through_the_api_equals_the_cli(cache, tmp_path):
    opts = dict(cache=str(cache), epochs=2, batch_size=8, dim=4, seed=3, device="cpu", workers=0, stop_after=1)
    for name in ("cli", "api", "full"):
        train(TrainConfig(out=str(tmp_path / name), **opts))
    _cli(["train", "--out", str(tmp_path / "cli"), "--resume"])
    cfg = with_saved_config(TrainConfig(out=str(tmp_path / "api"), resume=True))
    assert cfg.cache == str(cache) and cfg.seed == 3 and cfg.dim == 4 and cfg.stop_after is None
    train(cfg)
    train(TrainConfig(out=str(tmp_path / "full"), resume=True, **dict(opts, stop_after=None)))
    assert _metrics(tmp_path / "cli") == _metrics(tmp_path / "api") == _metrics(tmp_path / "full")


def test_with_saved_config_keeps_what_was_given(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"cache": "c", "epochs": 9, "device": "cpu", "out": "old",
                                                     "stop_after": 1, "resolved": {"dim": 4}}))
    base = TrainConfig(out=str(run), resume=True, epochs=30)  # 30 is the default
    assert with_saved_config(base).epochs == 9  # the API: a field at its default comes from the run
    assert with_saved_config(base, given={"epochs"}).epochs == 30  # the CLI: given on the command line
    cfg = with_saved_config(base)
    assert cfg.out == str(run) and cfg.stop_after is None and cfg.device == "cpu"
    assert with_saved_config(TrainConfig(out=str(run))) == TrainConfig(out=str(run))  # no resume: unchanged
    (run / "config.yaml").write_text("cache: c\nepochz: 3\n")
    with pytest.raises(TcskdError, match=r"config.yaml: unknown key 'epochz'"):
        with_saved_config(base)
