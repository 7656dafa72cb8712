"""Compare finished runs: a Markdown table and a bar chart of test top-1 (test mean IoU for segmentation).

Segmentation runs (``task: segment`` in final.json) get the columns val / test mean IoU and test pixel
accuracy instead of the top-1 and kNN ones (a mix of tasks gets both sets, each ``-`` where it does not
apply), and the chart shows test mIoU when every run segments.

A run directory (written by ``tcskd train``) holds ``final.json`` (the run's
summary), ``config.yaml`` and ``metrics.jsonl``. Runs are grouped by
(method, basis_kind, dim, labels_per_class), plus student / lambda / cache
key when those vary across the runs given, so that different experiments are
never averaged together. Each group shows mean ± sample standard deviation
(ddof=1) over its runs (seeds); a group of one run shows the value alone.
"""

from __future__ import annotations

import glob
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from tcskd.errors import TcskdError

log = logging.getLogger(__name__)

#: Always part of a group's key.
GROUP_KEYS = ("method", "basis_kind", "dim", "labels_per_class")
#: Added to the key (and shown as a column) only when they vary across runs.
OPTIONAL_KEYS = ("student", "lambda", "tailoring", "elsh_bits", "classify_from", "basis", "epochs", "mimic",
                 "target_norm", "holdout", "cache_key", "task", "mimic_on")
#: Baselines first (no KD, FitNet, online KD), in this order; other methods (tcs) follow alphabetically.
METHOD_ORDER = ("ce", "fitnet", "online")
MB = 1024 * 1024


# -- loading ----------------------------------------------------------------

def expand_run_dirs(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(run dirs holding final.json, paths skipped) from dirs or glob patterns.

    A pattern the shell did not expand is expanded here. A directory without
    ``final.json`` whose sub-directories hold one stands for those
    sub-directories (``tcskd report runs/``). Plain files (such as a
    ``report.png`` caught by ``runs/*``) are passed over without a word;
    directories without ``final.json`` and missing paths are returned as
    skipped. Order is kept, duplicates dropped.
    """
    found: list[Path] = []
    skipped: list[Path] = []
    for raw in paths:
        raw = str(raw)
        matches = sorted(glob.glob(raw)) if glob.has_magic(raw) else [raw]
        if not matches:
            skipped.append(Path(raw))
        for m in matches:
            p = Path(m)
            if p.is_file():
                log.debug("ignoring %s: a file, not a run directory", p)
                continue
            if (p / "final.json").is_file():
                found.append(p)
                continue
            children = sorted(c for c in p.iterdir() if (c / "final.json").is_file()) if p.is_dir() else []
            if children:
                found.extend(children)
            else:
                skipped.append(p)
    seen: set[Path] = set()
    unique = []
    for p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, skipped


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        log.warning("%s: unreadable YAML (%s); ignoring it", path, str(e).splitlines()[0])
        return {}
    return data if isinstance(data, dict) else {}


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: not JSON; skipped", path, i)
    return rows


def load_runs(run_dirs: Iterable[str | Path]) -> list[dict[str, Any]]:
    """One dict per run: the keys of ``final.json`` plus ``run_dir``, ``config``, ``metrics``.

    Directories without a readable ``final.json`` are skipped with a warning;
    TcskdError when no run is left.
    """
    runs = []
    for d in run_dirs:
        d = Path(d)
        final = d / "final.json"
        if not final.is_file():
            log.warning("skipping %s: no final.json (run unfinished or not a run directory)", d)
            continue
        try:
            summary = json.loads(final.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            log.warning("skipping %s: final.json is not valid JSON (%s)", d, e)
            continue
        if not isinstance(summary, dict):
            log.warning("skipping %s: final.json is not a JSON object", d)
            continue
        run = dict(summary)
        run["run_dir"] = str(d)
        run["config"] = _read_yaml(d / "config.yaml")
        run["metrics"] = _read_metrics(d / "metrics.jsonl")
        runs.append(run)
    if not runs:
        raise TcskdError("no run directory with a final.json among the paths given")
    return runs


def load_teacher_eval(path: str | Path) -> dict[str, Any]:
    """The JSON written by ``tcskd eval --out``; TcskdError when it is not one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise TcskdError(f"teacher eval file {p} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TcskdError(f"teacher eval file {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "knn_top1" not in data:
        raise TcskdError(f"teacher eval file {p} has no 'knn_top1' (write it with `tcskd eval --out`)")
    return data


# -- grouping and statistics --------------------------------------------------

def _varying_keys(runs: list[dict[str, Any]]) -> list[str]:
    return [k for k in OPTIONAL_KEYS if len({json.dumps(r.get(k), sort_keys=True) for r in runs}) > 1]


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """(mean, sample std with ddof=1 (None for one value), count) of the numeric values."""
    xs = [f for f in (_num(v) for v in values) if f is not None]
    if not xs:
        return None, None, 0
    arr = np.asarray(xs, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else None
    return float(arr.mean()), std, len(arr)


def _sort_key(key: tuple[Any, ...], names: list[str]) -> tuple[Any, ...]:
    k = dict(zip(names, key))
    lpc = _num(k.get("labels_per_class"))
    all_labels = lpc is None or lpc <= 0
    method = str(k.get("method"))
    m_rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    dim = _num(k.get("dim"))
    rest = tuple(str(k.get(n)) for n in names[4:])
    return (all_labels, lpc or 0.0, m_rank, method, str(k.get("basis_kind")),
            dim is not None, dim or 0.0, rest)


def group_runs(runs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(key names, groups sorted by labels per class then method); a group: {'key': {...}, 'runs': [...]}."""
    names = list(GROUP_KEYS) + _varying_keys(runs)
    groups: dict[str, dict[str, Any]] = {}
    for r in runs:
        key = tuple(r.get(n) for n in names)
        ident = json.dumps(key, sort_keys=True, default=str)
        groups.setdefault(ident, {"key": dict(zip(names, key)), "tuple": key, "runs": []})["runs"].append(r)
    ordered = sorted(groups.values(), key=lambda g: _sort_key(g["tuple"], names))
    for g in ordered:
        seeds = [r.get("seed") for r in g["runs"] if r.get("seed") is not None]
        if len(seeds) != len(set(map(str, seeds))):
            log.warning("group %s has runs with the same seed: %s", g["key"], [r["run_dir"] for r in g["runs"]])
        g["stats"] = summarise(g["runs"])
        del g["tuple"]
    return names, ordered


def summarise(runs: list[dict[str, Any]]) -> dict[str, tuple[float | None, float | None, int]]:
    """mean/std/count per reported quantity; accuracies in %, memory in MB (2**20 bytes)."""
    def col(name: str, scale: float) -> list[float | None]:
        return [(_num(r.get(name)) * scale) if _num(r.get(name)) is not None else None for r in runs]

    return {
        "val_top1": mean_std(col("val_top1", 100.0)),
        "test_top1": mean_std(col("test_top1", 100.0)),
        "knn_top1": mean_std(col("knn_top1", 100.0)),
        "val_miou": mean_std(col("val_miou", 100.0)),
        "test_miou": mean_std(col("test_miou", 100.0)),
        "test_pixel_acc": mean_std(col("test_pixel_acc", 100.0)),
        "img_per_s": mean_std(col("img_per_s", 1.0)),
        "peak_mem_mb": mean_std(col("peak_mem_bytes", 1.0 / MB)),
        "train_seconds": mean_std(col("train_seconds", 1.0)),
    }


# -- Markdown ----------------------------------------------------------------

def _fmt(stat: tuple[float | None, float | None, int], digits: int) -> str:
    mean, std, n = stat
    if mean is None:
        return "-"
    if digits == 0:
        text = f"{mean:,.0f}"
        return text if std is None else f"{text} ± {std:,.0f}"
    text = f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def _fmt_key(name: str, value: Any) -> str:
    if name == "labels_per_class":
        v = _num(value)
        return "all" if v is None or v <= 0 else f"{v:g}"
    if value is None:
        return "-"
    if name == "holdout" and isinstance(value, dict):
        n = value.get("val_per_class")
        return (f"{n}/class" if n is not None else f"{value.get('val_frac', 0):g}") + f" s{value.get('val_seed', 0)}"
    if name == "cache_key":
        return str(value)[:8]
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


HEADERS = {"method": "method", "basis_kind": "basis", "dim": "dim", "labels_per_class": "labels/class",
           "student": "student", "lambda": "lambda", "tailoring": "tailoring", "elsh_bits": "eLSH bits",
           "classify_from": "classifier on", "basis": "basis name", "epochs": "epochs", "mimic": "mimic",
           "target_norm": "target norm", "holdout": "validation", "cache_key": "cache", "task": "task",
           "mimic_on": "mimic on"}
#: Said under every table: which column choices are made on.
PROTOCOL = ("val top-1: the held-out validation rows of the training split, where settings are chosen; "
            "test top-1: the test split, evaluated once per run after training; kNN: test top-1 of a "
            "weighted kNN on the student's features whose references are only the labelled training rows.")
#: Said under a table of segmentation runs.
SEG_PROTOCOL = ("val mIoU: mean IoU on the held-out validation images, where settings are chosen; test mIoU and "
                "pixel accuracy: the test split, evaluated once per run after training.")
#: The score columns of each task: (header, summarised quantity).
SCORE_COLUMNS = {"classify": [("val top-1 (%)", "val_top1"), ("test top-1 (%)", "test_top1"),
                              ("kNN top-1 (%)", "knn_top1")],
                 "segment": [("val mIoU (%)", "val_miou"), ("test mIoU (%)", "test_miou"),
                             ("test pixel acc (%)", "test_pixel_acc")]}


def _tasks(runs: list[dict[str, Any]]) -> list[str]:
    """The tasks among ``runs``, classify first (final.json without ``task``: classify)."""
    have = {r.get("task") or "classify" for r in runs}
    return [t for t in ("classify", "segment") if t in have]


def teacher_lines(evals: list[dict[str, Any]]) -> list[str]:
    """One line per label budget of ``tcskd eval`` results: kNN / linear probe, val and test, mean ± std."""
    by: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for e in evals:  # only results of the same teacher, data, holdout and k are averaged
        lpc = _fmt_key("labels_per_class", e.get("labels_per_class"))
        same = tuple(json.dumps(e.get(n), sort_keys=True) for n in ("teacher", "data", "holdout", "k",
                                                                     "train_cache", "test_cache"))
        by.setdefault((lpc,) + same, []).append(e)
    lines = []
    for key in sorted(by, key=lambda v: (v[0] == "all", float(v[0]) if v[0] != "all" else 0.0, v[1:])):
        group, lpc = by[key], key[0]

        def stat(name: str) -> str:
            return _fmt(mean_std(100 * _num(e.get(name)) if _num(e.get(name)) is not None else None
                                 for e in group), 2)

        first = group[0]
        lines.append(f"**teacher, {lpc} labels/class** (`{first.get('teacher')}` on `{first.get('data')}`, "
                     f"{first.get('train_rows')} reference rows, n={len(group)}): kNN val {stat('val_knn_top1')} / "
                     f"test {stat('knn_top1')}; linear probe val {stat('val_linear_top1')} / "
                     f"test {stat('linear_top1')}")
    return lines


def markdown_table(runs: list[dict[str, Any]], teacher_eval: list[dict[str, Any]] | None = None) -> str:
    """A Markdown comparison table of the runs (one row per group), optionally under teacher lines."""
    names, groups = group_runs(runs)
    order = ["labels_per_class", "method", "basis_kind", "dim"] + names[4:]
    tasks = _tasks(runs)
    scores = [c for t in tasks for c in SCORE_COLUMNS[t]]
    headers = dict(HEADERS, labels_per_class="labelled images") if tasks == ["segment"] else HEADERS
    head = [headers[n] for n in order] + [h for h, _ in scores] + ["train img/s", "peak mem (MB)", "n"]
    align = ["---"] * len(order) + ["---:"] * (len(scores) + 3)
    lines = []
    if teacher_eval:
        lines += [line + "  " for line in teacher_lines(teacher_eval)] + [""]
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for g in groups:
        s = g["stats"]
        cells = [_fmt_key(n, g["key"][n]) for n in order]
        cells += [_fmt(s[q], 2) for _, q in scores]
        cells += [_fmt(s["img_per_s"], 0), _fmt(s["peak_mem_mb"], 0), str(len(g["runs"]))]
        lines.append("| " + " | ".join(cells) + " |")
    protocol = " ".join({"classify": PROTOCOL, "segment": SEG_PROTOCOL}[t] for t in tasks)
    lines += ["", f"mean ± sample std (ddof=1) over n runs (seeds); {len(runs)} run(s) in {len(groups)} group(s). "
              + protocol]
    return "\n".join(lines) + "\n"


# -- chart -------------------------------------------------------------------

def _group_label(key: dict[str, Any]) -> str:
    parts = [str(key.get("method"))]
    if key.get("basis_kind") is not None:
        parts.append(str(key["basis_kind"]))
    if key.get("dim") is not None:
        parts.append(f"k={key['dim']}")
    first = " ".join(parts)
    second = f"{_fmt_key('labels_per_class', key.get('labels_per_class'))}/class"
    for n in OPTIONAL_KEYS:
        if n in key:
            second += f" {HEADERS[n]}={_fmt_key(n, key[n])}"
    return f"{first}\n{second}"


def plot_runs(runs: list[dict[str, Any]], png_path: str | Path,
              teacher_eval: list[dict[str, Any]] | None = None) -> Path:
    """A bar chart of test top-1 (test mIoU when every run segments; mean ± sample std per group) written to
    ``png_path``.

    Uses the Agg canvas directly (no pyplot, no global backend change).
    Teacher kNN / linear-probe accuracies, when given, are drawn as lines.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The lines of the all-labels reference, if there is one.
    every = [e for e in teacher_eval or [] if _num(e.get("labels_per_class")) is None]
    teacher_eval = every[0] if every else None
    _, groups = group_runs(runs)
    metric, what = ("test_miou", "test mIoU") if _tasks(runs) == ["segment"] else ("test_top1", "test top-1")
    labels = [_group_label(g["key"]) for g in groups]
    means = [g["stats"][metric][0] for g in groups]
    stds = [g["stats"][metric][1] or 0.0 for g in groups]
    methods = sorted({str(g["key"].get("method")) for g in groups})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}

    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) + 2.0), 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(groups))
    heights = [m if m is not None else 0.0 for m in means]
    bars = ax.bar(xs, heights, yerr=stds, capsize=4,
                  color=[colors[str(g["key"].get("method"))] for g in groups], edgecolor="black", linewidth=0.5)
    for bar, m, s, g in zip(bars, means, stds, groups):
        text = "n/a" if m is None else f"{m:.1f}"
        ax.annotate(f"{text}\n(n={len(g['runs'])})", (bar.get_x() + bar.get_width() / 2, bar.get_height() + s),
                    xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=7)
    if teacher_eval is not None:
        for name, style in (("knn_top1", "--"), ("linear_top1", ":")):
            v = _num(teacher_eval.get(name))
            if v is not None:
                ax.axhline(100 * v, color="gray", linestyle=style, linewidth=1,
                           label=f"teacher {'kNN' if name == 'knn_top1' else 'linear probe'} {100 * v:.1f}")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7, rotation=30 if len(groups) > 6 else 0, ha="center")
    ax.set_ylabel(f"{what} (%)")
    top = max([m + s for m, s in zip(heights, stds)] + [100 * (_num((teacher_eval or {}).get(n)) or 0)
                                                          for n in ("knn_top1", "linear_top1")] + [1.0])
    ax.set_ylim(0, min(105.0, top * 1.12 + 1))
    ax.set_title(f"{what} per group (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
