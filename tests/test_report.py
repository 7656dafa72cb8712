"""The run comparison: grouping, mean ± std, the PNG, and the report command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tcskd.errors import TcskdError
from tcskd.train.report import group_runs, load_runs, markdown_table, mean_std, plot_runs
from tcskd.train.commands import report_cmd


def _run(root: Path, name: str, method: str, seed: int, top1: float, lpc: int | None = None,
         basis_kind: str | None = "pca", dim: int | None = 64, **extra) -> Path:
    d = root / name
    d.mkdir(parents=True)
    final = {"val_top1": top1 + 0.01, "test_top1": top1, "knn_top1": top1 - 0.05, "train_seconds": 10.0 + seed,
             "img_per_s": 1000.0 * (seed + 1), "peak_mem_bytes": (100 + seed) * 1024 * 1024, "method": method,
             "dim": dim, "labels_per_class": lpc, "seed": seed, "student": "resnet8", "basis": "pca",
             "basis_kind": basis_kind, "cache_key": "abcdef0123456789", "lambda": 1.0}
    final.update(extra)
    (d / "final.json").write_text(json.dumps(final))
    (d / "config.yaml").write_text(f"method: {method}\nseed: {seed}\n")
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "loss": 1.0, "test_top1": top1}) + "\n")
    return d


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    for s, acc in enumerate((0.90, 0.92, 0.97)):
        _run(root, f"tcs-s{s}", "tcs", s, acc)
    for s, acc in enumerate((0.80, 0.84)):
        _run(root, f"ce-s{s}", "ce", s, acc, basis_kind=None, dim=None)
    _run(root, "tcs-few", "tcs", 0, 0.70, lpc=10)
    (root / "unfinished").mkdir()
    return root


def _rows(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|")][2:]


def test_mean_std():
    m, s, n = mean_std([0.9, None, 0.92, 0.97])
    assert n == 3 and m == pytest.approx(np.mean([0.9, 0.92, 0.97]))
    assert s == pytest.approx(np.std([0.9, 0.92, 0.97], ddof=1))
    assert mean_std([1.0]) == (1.0, None, 1)
    assert mean_std([None]) == (None, None, 0)


def test_load_runs_and_table(runs_dir):
    dirs = sorted(p for p in runs_dir.iterdir())
    runs = load_runs(dirs)  # "unfinished" is skipped
    assert len(runs) == 6
    r0 = next(r for r in runs if r["run_dir"].endswith("tcs-s0"))
    assert r0["config"] == {"method": "tcs", "seed": 0} and r0["metrics"][0]["epoch"] == 0

    table = markdown_table(runs)
    rows = _rows(table)
    # labels per class first (10 before all), then method (baseline ce before tcs).
    assert [(r[0], r[1]) for r in rows] == [("10", "tcs"), ("all", "ce"), ("all", "tcs")]
    few, ce, tcs = rows
    accs = np.array([90.0, 92.0, 97.0])
    assert tcs[4] == f"{(accs + 1).mean():.2f} ± {(accs + 1).std(ddof=1):.2f}"  # val
    assert tcs[5] == f"{accs.mean():.2f} ± {accs.std(ddof=1):.2f}"
    assert tcs[6] == f"{(accs - 5).mean():.2f} ± {(accs - 5).std(ddof=1):.2f}"
    assert tcs[7] == "2,000 ± 1,000"  # img/s 1000, 2000, 3000
    assert tcs[8] == "101 ± 1"  # 100, 101, 102 MB
    assert tcs[9] == "3"
    assert ce[2] == "-" and ce[3] == "-" and ce[5] == "82.00 ± 2.83" and ce[9] == "2"
    assert few[5] == "70.00" and few[9] == "1"
    assert "settings are chosen" in table and "val top-1 (%)" in table.splitlines()[0]
    assert "student" not in table.splitlines()[0]  # student does not vary: no column


def test_varying_student_splits_groups(tmp_path):
    _run(tmp_path, "a", "tcs", 0, 0.9, student="resnet8")
    _run(tmp_path, "b", "tcs", 1, 0.8, student="mobilenet")
    names, groups = group_runs(load_runs([tmp_path / "a", tmp_path / "b"]))
    assert "student" in names and len(groups) == 2


def test_teacher_line_and_png(runs_dir, tmp_path):
    runs = load_runs([runs_dir / "tcs-s0", runs_dir / "ce-s0"])
    teacher = [{"knn_top1": 0.951, "linear_top1": 0.9634, "val_knn_top1": 0.96, "val_linear_top1": 0.97,
                "k": 20, "teacher": "builtin:x", "data": "d", "train_rows": 3600, "test_rows": 1000,
                "labels_per_class": None}] + [
        {"knn_top1": acc, "linear_top1": acc + 0.1, "val_knn_top1": acc, "val_linear_top1": acc, "k": 20,
         "teacher": "builtin:x", "data": "d", "train_rows": 100, "labels_per_class": 10, "seed": s}
        for s, acc in enumerate((0.5, 0.7))]
    table = markdown_table(runs, teacher)
    first, second = table.splitlines()[:2]
    assert first.startswith("**teacher, 10 labels/class**") and "n=2" in first
    assert "kNN val 60.00 ± 14.14 / test 60.00 ± 14.14; linear probe val 60.00 ± 14.14 / test 70.00 ± 14.14" in first
    assert second.startswith("**teacher, all labels/class**") and "linear probe val 97.00 / test 96.34" in second
    png = plot_runs(runs, tmp_path / "out" / "chart.png", teacher)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_load_runs_none(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(TcskdError):
        load_runs([tmp_path / "x"])


def test_report_command(runs_dir, tmp_path):
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps({"knn_top1": 0.9, "linear_top1": 0.95, "k": 20}))
    dirs = [str(p) for p in sorted(runs_dir.iterdir())]
    md = tmp_path / "r.md"
    r = CliRunner().invoke(report_cmd, dirs + ["--teacher-eval", str(teacher), "--out", str(md)])
    assert r.exit_code == 0, r.output
    assert "| all | tcs |" in r.stdout and "**teacher" in r.stdout
    assert "skipping" in r.stderr and "unfinished" in r.stderr
    png = runs_dir / "report.png"  # default: the common parent of the run dirs
    assert str(png) in r.stderr and png.stat().st_size > 0
    assert md.read_text() == r.stdout
    # Again with a pattern that now also matches report.png: the file is passed over quietly.
    r = CliRunner().invoke(report_cmd, [str(runs_dir / "*"), str(tmp_path / "missing")])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if "skipping" in line]
    assert len(warnings) == 2 and "unfinished: no final.json" in warnings[0]
    assert "missing: no such directory" in warnings[1]


def test_report_teacher_eval_globs_and_costs(runs_dir, tmp_path):
    """A quoted --teacher-eval glob stands for every file it matches (once each); one that matches nothing is
    a one-line error. --cost adds the cost columns."""
    for lpc, knn in ((10, 0.5), (20, 0.7)):
        (tmp_path / f"teacher-lpc{lpc}.json").write_text(json.dumps({"knn_top1": knn, "labels_per_class": lpc}))
    dirs = [str(p) for p in sorted(runs_dir.iterdir())]
    pattern = str(tmp_path / "teacher-*.json")
    r = CliRunner().invoke(report_cmd, dirs + ["--teacher-eval", pattern, "--teacher-eval",
                                               str(tmp_path / "teacher-lpc10.json"), "--cost"])
    assert r.exit_code == 0, r.output
    teacher = [line for line in r.stdout.splitlines() if line.startswith("**teacher")]
    assert [t.split(" (")[0] for t in teacher] == ["**teacher, 10 labels/class**", "**teacher, 20 labels/class**"]
    assert "n=1" in teacher[0]  # the file named twice counts once
    head = next(line for line in r.stdout.splitlines() if line.startswith("| labels/class"))
    assert head.endswith("| train s/epoch | run wall (s) | peak over imports (MB) | n |")
    r = CliRunner().invoke(report_cmd, dirs + ["--teacher-eval", str(tmp_path / "nothing-*.json")])
    assert isinstance(r.exception, TcskdError) and "matches no file" in str(r.exception)


def test_report_command_glob_and_png(runs_dir, tmp_path):
    png = tmp_path / "c.png"
    r = CliRunner().invoke(report_cmd, [str(runs_dir / "tcs-s*"), "--png", str(png)])
    assert r.exit_code == 0, r.output
    assert len(_rows(r.stdout)) == 1 and _rows(r.stdout)[0][9] == "3"
    assert png.stat().st_size > 0
    # A directory of run directories stands for its runs.
    r = CliRunner().invoke(report_cmd, [str(runs_dir), "--png", str(png)])
    assert r.exit_code == 0 and len(_rows(r.stdout)) == 3


def test_report_command_no_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(report_cmd, [str(tmp_path / "empty"), str(tmp_path / "missing")])
    assert r.exit_code != 0 and isinstance(r.exception, TcskdError)
    assert "no final.json" in str(r.exception)


def test_segment_runs_get_miou_columns_and_chart(tmp_path):
    seg = dict(task="segment", val_top1=None, test_top1=None, knn_top1=None)
    for s, (val, test) in enumerate(((0.40, 0.42), (0.44, 0.46))):
        _run(tmp_path / "seg", f"tcs-{s}", "tcs", s, 0.0, lpc=8, mimic_on="dense", val_miou=val, test_miou=test,
             test_pixel_acc=0.9 + s / 100, **seg)
    _run(tmp_path / "seg", "ce-0", "ce", 0, 0.0, lpc=8, basis_kind=None, dim=None, mimic_on=None, val_miou=0.3,
         test_miou=0.31, test_pixel_acc=0.85, **seg)
    runs = load_runs(sorted((tmp_path / "seg").iterdir()))
    table = markdown_table(runs)
    head = table.splitlines()[0]
    assert "val mIoU (%)" in head and "test mIoU (%)" in head and "top-1" not in head
    assert head.startswith("| labelled images |") and "mimic on" in head
    rows = {r[1]: r for r in _rows(table)}
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert rows["tcs"][cols.index("test mIoU (%)")] == f"44.00 ± {np.std([42.0, 46.0], ddof=1):.2f}"
    assert rows["ce"][cols.index("val mIoU (%)")] == "30.00" and rows["ce"][cols.index("test pixel acc (%)")] == "85.00"
    assert "val mIoU: mean IoU on the held-out validation images" in table
    # a mix of tasks shows both sets of columns
    _run(tmp_path / "cls", "tcs-c", "tcs", 0, 0.9, task="classify")
    mixed = markdown_table(load_runs([*sorted((tmp_path / "seg").iterdir()), tmp_path / "cls" / "tcs-c"]))
    assert "test top-1 (%)" in mixed.splitlines()[0] and "test mIoU (%)" in mixed.splitlines()[0]
    assert plot_runs(runs, tmp_path / "seg.png").stat().st_size > 0
