"""`scripts/grid.sh --print` against the README's grid table: every published row is a configuration the
grid trains, as tcskd train resolves it (tcskd.train.config.resolve_config), and every configuration is a
published row."""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tcskd.train.report import _fmt_key

ROOT = Path(__file__).resolve().parents[1]
#: The README grid table's defining columns and the printed keys they show.
COLUMNS = {"labels/class": "labels_per_class", "method": "method", "basis": "basis", "dim": "dim",
           "lambda": "lambda", "tailoring": "tailoring", "eLSH bits": "elsh_bits", "classifier on": "classify_from"}


#: The heading of the README section whose first table with a "method" column is the grid's.
GRID_HEADING = "### Results on the built-in default: which idea does what"


#: The value of a defining column that ``tcskd report`` leaves out because no run of the table varies it.
OMITTED = {"eLSH bits": "0", "tailoring": "off", "classifier on": "feature"}


def _readme_grid_rows() -> list[tuple[str, ...]]:
    """The defining cells of each row of the grid's table in the README (``tcskd report``'s output: a column
    that no run varies is left out, and stands for its value in :data:`OMITTED`)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    section = lines.index(GRID_HEADING)
    start = next(i for i in range(section, len(lines)) if lines[i].startswith("| labels/class | method |"))
    head = [c.strip() for c in lines[start].strip("|").split("|")]
    idx = [head.index(c) if c in head else None for c in COLUMNS]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(tuple(OMITTED[c] if i is None else cells[i] for c, i in zip(COLUMNS, idx)))
    return rows


TCSKD = f"{sys.executable} -m tcskd"


@functools.lru_cache(maxsize=1)
def _print_grid() -> dict[str, dict]:
    """NAME-lpcL -> the resolved row ``scripts/grid.sh --print`` prints for it."""
    env = dict(os.environ, TCSKD=TCSKD, PYTHONPATH=str(ROOT), LPCS="10 all")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "grid.sh"), "--print"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return {name: json.loads(text) for name, _, text in (line.partition("\t") for line in out.splitlines())}


def _printed_rows() -> dict[tuple[str, ...], str]:
    rows = {}
    for name, row in _print_grid().items():
        cells = tuple(_fmt_key(key, row[key]) for key in COLUMNS.values())
        assert cells not in rows, f"{name} and {rows[cells]} define the same row"
        rows[cells] = name
    return rows


def _matches(printed: tuple[str, ...], readme: tuple[str, ...]) -> bool:
    """Equal cells; fitnet's dim prints as ``all`` (every dimension of the cache: 1280 in the README)."""
    dim = list(COLUMNS).index("dim")
    fitnet_dim = printed[1] == "fitnet" and printed[dim] == "all" and readme[dim].isdigit()
    return all(p == r or (i == dim and fitnet_dim) for i, (p, r) in enumerate(zip(printed, readme)))


def _readme_not_rerun() -> set[str]:
    """The grid configurations the README says were not rerun for its table (its "Not rerun" line)."""
    text = (ROOT / "README.md").read_text()
    line = next((line for line in text.splitlines() if line.startswith("Not rerun for this table:")), "")
    return set(re.findall(r"`([a-z0-9-]+)`", line))


def test_grid_print_is_the_readme_grid_table():
    printed = _printed_rows()
    readme = _readme_grid_rows()
    configs = {name.rsplit("-lpc", 1)[0] for name in printed.values()}
    assert len(printed) == 2 * len(configs) == 48  # 24 configurations x 2 label budgets
    unmatched_readme = [r for r in readme if not any(_matches(p, r) for p in printed)]
    assert unmatched_readme == []
    # every configuration is a row of the table, or named as not rerun for it (and not both)
    shown = {printed[p].rsplit("-lpc", 1)[0] for p in printed if any(_matches(p, r) for r in readme)}
    assert shown | _readme_not_rerun() == configs and not shown & _readme_not_rerun()
    assert len(readme) == 2 * len(shown)
    # The rows that used to rely on the defaults, resolved: no tailoring, the classifier on the feature.
    by_name = {v: k for k, v in printed.items()}
    assert by_name["tcs-k64-lpcall"] == ("all", "tcs", "pca", "64", "10", "off", "0", "feature")
    assert by_name["tail-taylor-coords-lpcall"][5:] == ("taylor/1ep/-0.2/min64", "0", "coords")


FAKE_TCSKD = """#!/usr/bin/env bash
[ "$1" = -q ] && shift
case "$1" in
  cache) echo /fake/cache ;;
  train) shift; printf '%s\\n' "$*" >> "$TRAIN_LOG" ;;
esac
"""


def test_grid_trains_what_it_prints(tmp_path):
    """The grid's training command lines (a stand-in tcskd records them) resolve, run by run, to the rows
    --print lists: both come from one function of scripts/grid.sh."""
    fake = tmp_path / "tcskd"
    fake.write_text(FAKE_TCSKD)
    fake.chmod(0o755)
    log = tmp_path / "train.log"
    env = dict(os.environ, TCSKD=str(fake), TRAIN_LOG=str(log), RUNS=str(tmp_path / "runs"), SEEDS="0 1",
               LPCS="10 all", JOBS="1")
    subprocess.run(["bash", str(ROOT / "scripts" / "grid.sh")], env=env, cwd=tmp_path, capture_output=True,
                   text=True, timeout=120, check=True)
    lines = log.read_text().splitlines()
    assert len(lines) == len(_print_grid()) * 2  # configurations x label budgets x seeds
    listing = tmp_path / "runs.txt"
    with listing.open("w") as f:
        for line in lines:
            words = shlex.split(line)
            out = Path(words[words.index("--out") + 1]).name  # NAME-lpcL-sS
            f.write(f"{out}\t{line}\n")
    got = subprocess.run([*shlex.split(TCSKD), "train", "--print-configs", str(listing)], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120,
                         check=True).stdout
    printed = _print_grid()
    seen = set()
    for name, _, text in (row.partition("\t") for row in got.splitlines()):
        config = name.rsplit("-s", 1)[0]
        assert json.loads(text) == printed[config], name
        seen.add(config)
    assert seen == set(printed)


def test_print_config_resolves_like_training_without_opening_the_cache():
    from click.testing import CliRunner

    from tcskd.cli import main

    def row(*args: str) -> dict:
        r = CliRunner().invoke(main, ["train", "--cache", "no-such-cache", "--print-config", *args])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    # the defaults: the first 64 coordinates at every label budget (--tailor auto is off)
    assert row() == {"method": "tcs", "basis": "pca", "dim": 64, "lambda": 10.0,
                     "tailoring": "off", "elsh_bits": 0, "classify_from": "feature",
                     "labels_per_class": None}
    assert row("--tailor", "on")["tailoring"] == "taylor/1ep/-0.2/min64" and row("--tailor", "on")["dim"] == 256
    assert row("--labels-per-class", "10")["tailoring"] == "off" and row("--labels-per-class", "10")["dim"] == 64
    assert row("--tailor", "off") | {"labels_per_class": None} == row("--labels-per-class", "10") | {
        "labels_per_class": None}
    assert row("--method", "ce", "--lambda", "3") == {"method": "ce", "basis": None, "dim": None, "lambda": 0.0,
                                                      "tailoring": "off", "elsh_bits": 0,
                                                      "classify_from": "feature", "labels_per_class": None}
    r = CliRunner().invoke(main, ["train", "--cache", "x", "--print-config", "--dim", "0"])
    assert r.exit_code == 2 and "--dim must be >= 1" in r.output  # checked as training checks it
