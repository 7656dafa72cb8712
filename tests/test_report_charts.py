"""The report's charts, read back as matplotlib objects: one panel per label budget with that budget's teacher
lines, y zoomed to the data, error bars of the std over seeds, a legend of configurations; the sweep (accuracy
against K per basis) and the few-shot curve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.container import ErrorbarContainer

from tcskd.errors import TcskdError
from tcskd.train.commands import report_cmd
from tcskd.train.report import comparison_figure, load_runs, plot_sweep, sweep_figure

#: (method, basis kind, dim, labels per class) -> test top-1 of seeds 0, 1, 2.
ACC = {("ce", None, None, 10): (0.71, 0.74, 0.70), ("tcs", "pca", 64, 10): (0.90, 0.88, 0.93),
       ("tcs", "random", 64, 10): (0.86, 0.87, 0.91), ("ce", None, None, None): (0.97, 0.975, 0.98),
       ("tcs", "pca", 64, None): (0.965, 0.97, 0.972), ("tcs", "random", 64, None): (0.96, 0.969, 0.962)}
TEACHER = [{"labels_per_class": 10, "seed": 0, "knn_top1": 0.70, "linear_top1": 0.72},
           {"labels_per_class": 10, "seed": 1, "knn_top1": 0.74, "linear_top1": 0.76},
           {"labels_per_class": None, "seed": 0, "knn_top1": 0.889, "linear_top1": 0.941}]


def _write(root: Path, name: str, seed: int, acc: float, **final) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "final.json").write_text(json.dumps({"test_top1": acc, "val_top1": acc, "seed": seed, "lambda": 10.0,
                                              "student": "cnn", **final}))
    return d


def _runs(root: Path, table: dict = ACC) -> list[dict]:
    dirs = []
    for (method, kind, dim, lpc), accs in table.items():
        for seed, acc in enumerate(accs):
            dirs.append(_write(root, f"{method}-{kind}-{dim}-{lpc}-s{seed}", seed, acc, method=method,
                               basis_kind=kind, basis=kind, dim=dim, labels_per_class=lpc))
    return load_runs(dirs)


def _teacher_lines(ax) -> dict[str, float]:
    out = {}
    for line in ax.get_lines():
        gid = str(line.get_gid())
        if gid.startswith("teacher:"):
            ys = set(np.asarray(line.get_ydata(), dtype=float))
            assert len(ys) == 1
            out[gid.split(":")[1]] = ys.pop()
    return out


def _errorbars(ax) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def _half_heights(container: ErrorbarContainer) -> list[float]:
    """Half the height of each vertical error bar (the std it was drawn with)."""
    segments = container.lines[2][0].get_segments()
    return [float(abs(s[1][1] - s[0][1]) / 2) for s in segments]


def test_comparison_chart_panels_teacher_lines_zoom_errorbars_legend(tmp_path):
    fig = comparison_figure(_runs(tmp_path), TEACHER)
    axes = fig.axes
    assert len(axes) == 2  # one panel per label budget: 10, then all
    assert [ax.get_title() for ax in axes] == ["10 labels/class", "all labels/class"]
    # each panel's teacher lines are that budget's numbers (10: the mean of the two seeds' evals)
    assert _teacher_lines(axes[0]) == pytest.approx({"knn_top1": 72.0, "linear_top1": 74.0})
    assert _teacher_lines(axes[1]) == pytest.approx({"knn_top1": 88.9, "linear_top1": 94.1})
    for ax, lpc in zip(axes, (10, None)):
        keys = [k for k in ACC if k[3] == lpc]  # bars in the table's order: ce, then tcs pca, tcs random
        means = [100 * np.mean(ACC[k]) for k in keys]
        stds = [100 * np.std(ACC[k], ddof=1) for k in keys]
        assert [b.get_height() for b in ax.patches] == pytest.approx(means)
        (bars,) = _errorbars(ax)
        assert _half_heights(bars) == pytest.approx(stds)
        low, high = ax.get_ylim()
        lowest = min([m - s for m, s in zip(means, stds)] + list(_teacher_lines(ax).values()))
        highest = max([m + s for m, s in zip(means, stds)] + list(_teacher_lines(ax).values()))
        assert 50 < low < lowest and highest < high <= 100  # zoomed to the data and teacher lines, not from 0
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"]  # numbers; the legend names them
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "1: ce", "2: tcs pca K=64", "3: tcs random K=64", "teacher kNN", "teacher linear probe"]
    # the same configuration has the same colour in both panels
    assert [b.get_facecolor() for b in axes[0].patches] == [b.get_facecolor() for b in axes[1].patches]


SWEEP = {("tcs", kind, dim, lpc): tuple(a + (0.01 if kind == "pca" else 0.0) + dim / 10000 + s / 100
                                        for s in range(2))
         for kind in ("pca", "random") for dim in (32, 64, 128) for lpc, a in ((10, 0.85), (None, 0.95))}


def test_sweep_accuracy_against_k_per_basis(tmp_path):
    fig = sweep_figure(_runs(tmp_path, SWEEP), x="dim", series="basis", teacher_eval=TEACHER, split="test")
    assert len(fig.axes) == 2
    for ax, lpc in zip(fig.axes, (10, None)):
        lines = {c.get_label(): c for c in _errorbars(ax)}
        assert sorted(lines) == ["pca", "random"]
        for kind, c in lines.items():
            x, y = c.lines[0].get_data()
            assert list(x) == [32, 64, 128]
            assert list(y) == pytest.approx([100 * np.mean(SWEEP["tcs", kind, d, lpc]) for d in (32, 64, 128)])
            assert _half_heights(c) == pytest.approx([100 * np.std(SWEEP["tcs", kind, d, lpc], ddof=1)
                                                      for d in (32, 64, 128)])
        ref = {"knn_top1": 72.0, "linear_top1": 74.0} if lpc == 10 else {"knn_top1": 88.9, "linear_top1": 94.1}
        assert _teacher_lines(ax) == pytest.approx(ref)
        assert ax.get_ylim()[0] > 50
    # a line whose runs differ in something besides K is refused in one line
    bad = dict(SWEEP)
    runs = _runs(tmp_path / "bad", bad)
    runs[0]["lambda"] = 3.0
    with pytest.raises(TcskdError, match="also differ in lambda"):
        sweep_figure(runs, x="dim", series="basis")


FEW = {("ce", None, None, n): (a, a + 0.02) for n, a in ((1, 0.30), (5, 0.55), (10, 0.70))}
FEW |= {("tcs", "pca", 64, n): (a, a + 0.04) for n, a in ((1, 0.60), (5, 0.82), (10, 0.88))}
FEW |= {("tcs", "pca", 64, None): (0.97, 0.975)}  # every label: not a point of the curve


def test_few_shot_curve_with_teacher_lines(tmp_path):
    teacher = [{"labels_per_class": n, "knn_top1": k, "linear_top1": p}
               for n, k, p in ((1, 0.4, 0.35), (5, 0.6, 0.62), (10, 0.72, 0.74), (None, 0.889, 0.941))]
    fig = sweep_figure(_runs(tmp_path, FEW), x="labels_per_class", series="method", teacher_eval=teacher,
                       split="test")
    (ax,) = fig.axes
    lines = {c.get_label(): c for c in _errorbars(ax)}
    assert sorted(lines) == ["ce", "tcs"]
    x, y = lines["tcs"].lines[0].get_data()
    assert list(x) == [1, 5, 10] and list(y) == pytest.approx([62.0, 84.0, 90.0])
    assert _half_heights(lines["ce"]) == pytest.approx([100 * np.std([0, 0.02], ddof=1)] * 3)
    teacher_lines = {str(t.get_gid()): t.get_data() for t in ax.get_lines() if str(t.get_gid()).startswith("teacher:")}
    assert list(teacher_lines["teacher:knn_top1"][0]) == [1, 5, 10]
    assert list(teacher_lines["teacher:knn_top1"][1]) == pytest.approx([40.0, 60.0, 72.0])
    assert list(teacher_lines["teacher:linear_top1"][1]) == pytest.approx([35.0, 62.0, 74.0])


def test_report_command_sweep(tmp_path):
    _runs(tmp_path / "runs", SWEEP)
    png = tmp_path / "k.png"
    r = CliRunner().invoke(report_cmd, [str(tmp_path / "runs"), "--sweep", "dim", "--series", "basis",
                                        "--png", str(png)])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(report_cmd, [str(tmp_path / "runs"), "--sweep", "colour", "--png", str(png)])
    assert isinstance(r.exception, TcskdError) and "unknown sweep key 'colour'" in str(r.exception)
    assert plot_sweep(load_runs(sorted((tmp_path / "runs").iterdir())), tmp_path / "p.png").stat().st_size > 0


def test_config_labels_name_only_what_differs_from_the_common_value():
    from tcskd.train.report import _config_labels

    base = {"method": "tcs", "basis_kind": "pca", "dim": 64, "labels_per_class": 10, "lambda": 10.0,
            "elsh_bits": 0}
    keys = [base, dict(base, **{"lambda": 3.0}), dict(base, elsh_bits=256), dict(base, method="ce", basis_kind=None,
                                                                                  dim=None, **{"lambda": 0.0})]
    assert _config_labels(keys) == ["tcs pca K=64", "tcs pca K=64 λ=3", "tcs pca K=64 eLSH 256", "ce"]


def test_sweep_on_val_reads_the_val_columns(tmp_path):
    """Settings are read on val: the default sweep charts each run's val top-1 and the teacher's val lines."""
    root = tmp_path / "runs"
    for seed, (val, test) in enumerate([(0.50, 0.90), (0.60, 0.92)]):
        d = _write(root, f"tcs-k8-s{seed}", seed, test, dim=8)
        final = json.loads((d / "final.json").read_text())
        final["val_top1"] = val
        (d / "final.json").write_text(json.dumps(final))
    teacher = [{"labels_per_class": None, "knn_top1": 0.9, "linear_top1": 0.95, "val_knn_top1": 0.55,
                "val_linear_top1": 0.58}]
    runs = load_runs(sorted(root.iterdir()))
    (ax,) = sweep_figure(runs, x="dim", series="basis", teacher_eval=teacher).axes
    (line,) = _errorbars(ax)
    assert list(line.lines[0].get_data()[1]) == pytest.approx([55.0])
    assert _teacher_lines(ax) == pytest.approx({"knn_top1": 55.0, "linear_top1": 58.0})
    (ax,) = sweep_figure(runs, x="dim", series="basis", teacher_eval=teacher, split="test").axes
    assert list(_errorbars(ax)[0].lines[0].get_data()[1]) == pytest.approx([91.0])
    assert _teacher_lines(ax) == pytest.approx({"knn_top1": 90.0, "linear_top1": 95.0})


def test_kept_ranks_chart_draws_each_selection_step(tmp_path):
    """One panel per tailored configuration: a dot per active rank at the epoch it took effect, and the title's
    count of finally kept coordinates among the leading 64, per seed; untailored runs are left out."""
    from tcskd.train.report import kept_ranks_figure

    root = tmp_path / "runs"
    steps = {"epoch": [0, 2, 3], "ranks": [list(range(256)), list(range(51, 256)), list(range(100, 264))]}
    for seed, final in enumerate([list(range(100, 164)), list(range(32, 96))]):
        _write(root, f"tail-s{seed}", seed, 0.9, method="tcs", dim=256, tailoring="taylor/1ep/-0.2/min64",
               epochs=15, kept_ranks=steps, final_kept_ranks=final)
    _write(root, "fixed-s0", 0, 0.9, method="tcs", dim=64, tailoring="off", epochs=15,
           kept_ranks={"epoch": [0], "ranks": [list(range(64))]}, final_kept_ranks=list(range(64)))
    fig = kept_ranks_figure(load_runs(sorted(root.iterdir())))
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 1
    ax = visible[0]
    dots = [c.get_offsets() for c in ax.collections]
    assert [len(d) for d in dots] == [256, 205, 164]
    assert [sorted(set(d[:, 0].tolist())) for d in dots] == [[0.0], [2.0], [3.0]]
    assert dots[2][:, 1].min() == 100
    assert "kept in the leading 64: 0/64, 32/64" in ax.get_title()
    with pytest.raises(TcskdError, match="no run among these tailored"):
        kept_ranks_figure(load_runs([root / "fixed-s0"]))


def test_a_segmentation_sweep_charts_val_miou_per_labelled_images(tmp_path):
    """Segmentation runs: the sweep charts mean IoU, and a panel is named by its labelled images (masks)."""
    dirs = [_write(tmp_path, f"tcs-{kind}-{dim}-s{seed}", seed, 0.0, method="tcs", basis_kind=kind, basis=kind,
                   dim=dim, labels_per_class=50, task="segment", val_miou=0.1 * dim / 64 + seed / 100)
            for kind in ("pca", "random") for dim in (4, 64) for seed in range(2)]
    (ax,) = sweep_figure(load_runs(dirs), x="dim", series="basis").axes
    assert ax.get_title() == "50 labelled images" and ax.get_ylabel() == "val mIoU (%)"
    x, y = {c.get_label(): c for c in _errorbars(ax)}["pca"].lines[0].get_data()
    assert list(x) == [4, 64] and list(y) == pytest.approx([100 * (0.1 * 4 / 64 + 0.005), 100 * (0.1 + 0.005)])
