"""Compare finished runs: a Markdown table and charts of test top-1 (test mean IoU for segmentation): a bar chart
per label budget (:func:`plot_runs`) and a sweep or few-shot curve (:func:`plot_sweep`).

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
                 "target_norm", "holdout", "cache_key", "task", "mimic_on", "augment")
#: Keys that runs written before they were recorded lack: such a run does not make them vary.
RECENT_KEYS = ("augment",)
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


def teacher_eval_files(paths: Iterable[str]) -> list[str]:
    """``paths`` with each glob pattern replaced by the files it matches (sorted); TcskdError for a pattern that
    matches nothing."""
    out: list[str] = []
    for raw in paths:
        if glob.has_magic(raw):
            matches = sorted(glob.glob(raw))
            if not matches:
                raise TcskdError(f"--teacher-eval {raw} matches no file")
            out += [m for m in matches if m not in out]
        elif raw not in out:
            out.append(raw)
    return out


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

def _varies(runs: list[dict[str, Any]], k: str) -> bool:
    """Whether ``runs`` hold more than one value of ``k`` (a run without a key of :data:`RECENT_KEYS` counts
    for none)."""
    return len({json.dumps(r.get(k), sort_keys=True) for r in runs if k not in RECENT_KEYS or k in r}) > 1


def _varying_keys(runs: list[dict[str, Any]]) -> list[str]:
    return [k for k in OPTIONAL_KEYS if _varies(runs, k)]


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
        "seconds_per_epoch": mean_std(col("seconds_per_epoch", 1.0)),
        "total_seconds": mean_std(col("total_seconds", 1.0)),
        "peak_over_imports_mb": mean_std(col("peak_mem_over_imports_bytes", 1.0 / MB)),
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
           "mimic_on": "mimic on", "augment": "augment"}
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


#: The columns ``cost=True`` adds: (header, summarised quantity, digits).
COST_COLUMNS = (("train s/epoch", "seconds_per_epoch", 2), ("run wall (s)", "total_seconds", 0),
                ("peak over imports (MB)", "peak_over_imports_mb", 0))
#: Said under a table with the cost columns.
COST_PROTOCOL = ("train s/epoch: the median training seconds of the epochs after the first (validation "
                 "excluded); run wall: the run's process from its start to final.json; peak over imports: the "
                 "process's peak RSS less its RSS when training started (CPU; '-' on a GPU or off Linux).")


def markdown_table(runs: list[dict[str, Any]], teacher_eval: list[dict[str, Any]] | None = None,
                   cost: bool = False) -> str:
    """A Markdown comparison table of the runs (one row per group), optionally under teacher lines
    (``cost``: with :data:`COST_COLUMNS`)."""
    names, groups = group_runs(runs)
    order = ["labels_per_class", "method", "basis_kind", "dim"] + names[4:]
    tasks = _tasks(runs)
    scores = [c for t in tasks for c in SCORE_COLUMNS[t]]
    headers = dict(HEADERS, labels_per_class="labelled images") if tasks == ["segment"] else HEADERS
    costs = COST_COLUMNS if cost else ()
    head = ([headers[n] for n in order] + [h for h, _ in scores] + ["train img/s", "peak mem (MB)"]
            + [h for h, _, _ in costs] + ["n"])
    align = ["---"] * len(order) + ["---:"] * (len(scores) + 3 + len(costs))
    lines = []
    if teacher_eval:
        lines += [line + "  " for line in teacher_lines(teacher_eval)] + [""]
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for g in groups:
        s = g["stats"]
        cells = [_fmt_key(n, g["key"][n]) for n in order]
        cells += [_fmt(s[q], 2) for _, q in scores]
        cells += [_fmt(s["img_per_s"], 0), _fmt(s["peak_mem_mb"], 0)]
        cells += [_fmt(s[q], digits) for _, q, digits in costs] + [str(len(g["runs"]))]
        lines.append("| " + " | ".join(cells) + " |")
    protocol = " ".join([{"classify": PROTOCOL, "segment": SEG_PROTOCOL}[t] for t in tasks]
                        + ([COST_PROTOCOL] if cost else []))
    lines += ["", f"mean ± sample std (ddof=1) over n runs (seeds); {len(runs)} run(s) in {len(groups)} group(s). "
              + protocol]
    return "\n".join(lines) + "\n"


# -- charts ------------------------------------------------------------------

#: What each teacher line is: (key of ``tcskd eval``'s JSON, legend text, line style).
TEACHER_LINES = (("knn_top1", "teacher kNN", "--"), ("linear_top1", "teacher linear probe", ":"))
#: Names accepted for a sweep's x / series / panel besides the run keys (the table's column names).
SWEEP_ALIASES = {"basis": "basis_kind", "k": "dim", "labels": "labels_per_class", "lpc": "labels_per_class",
                 "labels_per_class": "labels_per_class"}
#: Keys a sweep never compares (they differ between the seeds of one configuration or say nothing of it).
_RUN_ONLY = ("cache_key",)


def _budget(value: Any) -> float | None:
    """A label budget as a number; None for every label."""
    v = _num(value)
    return None if v is None or v <= 0 else v


def _budget_order(budgets: Iterable[Any]) -> list[float | None]:
    """The distinct label budgets, numbers increasing, every label (None) last."""
    seen = {_budget(b) for b in budgets}
    return sorted((b for b in seen if b is not None)) + ([None] if None in seen else [])


def teacher_reference(teacher_eval: list[dict[str, Any]] | None, budget: float | None,
                      split: str = "test") -> dict[str, float]:
    """The teacher's kNN and linear-probe top-1 (%) at a label budget on ``split`` (test, or val: the held-out
    rows): the mean over the ``tcskd eval`` results of that budget (seeds); keys of :data:`TEACHER_LINES`
    that some result gives."""
    evals = [e for e in teacher_eval or [] if _budget(e.get("labels_per_class")) == budget]
    out = {}
    for key, _, _ in TEACHER_LINES:
        src = key if split == "test" else f"val_{key}"
        mean, _, n = mean_std(100 * _num(e[src]) for e in evals if _num(e.get(src)) is not None)
        if n:
            out[key] = mean
    return out


def _metric(runs: list[dict[str, Any]], split: str = "test") -> tuple[str, str]:
    if split not in ("val", "test"):
        raise TcskdError(f"unknown split '{split}' for a chart (choose val or test)")
    return ((f"{split}_miou", f"{split} mIoU") if _tasks(runs) == ["segment"]
            else (f"{split}_top1", f"{split} top-1"))


#: How a chart's legend names an option (a prefix of its value).
SHORT = {"lambda": "λ=", "elsh_bits": "eLSH ", "classify_from": "classifier on ", "tailoring": "tailor ",
         "student": "", "basis": "basis ", "mimic": "", "target_norm": "norm ", "task": "", "mimic_on": "mimic on ",
         "augment": "augment "}


def _config_labels(keys: list[dict[str, Any]], skip: Iterable[str] = ("labels_per_class",)) -> list[str]:
    """A short name per configuration: method, basis kind, K, then each varying option whose value is not the
    most common one among ``keys`` (e.g. ``tcs pca K=64 λ=3``); distinct keys get distinct names."""
    skip = set(skip)
    modal = {}
    for n in OPTIONAL_KEYS:
        values = [json.dumps(k.get(n), sort_keys=True, default=str) for k in keys if n in k]
        if values:
            modal[n] = max(dict.fromkeys(values), key=values.count)
    labels = []
    for key in keys:
        parts = [str(key.get("method"))]
        if key.get("basis_kind") is not None and "basis_kind" not in skip:
            parts.append(str(key["basis_kind"]))
        if key.get("dim") is not None and "dim" not in skip:
            parts.append(f"K={key['dim']}")
        for n in OPTIONAL_KEYS:
            if n not in key or n in skip or json.dumps(key[n], sort_keys=True, default=str) == modal.get(n):
                continue
            if ((n == "basis" and key[n] in (None, key.get("basis_kind")))
                    or (n == "lambda" and key.get("method") == "ce")):
                continue  # the basis's name says nothing its kind does not; ce has no mimic term
            parts.append(f"{SHORT.get(n, HEADERS[n] + '=')}{_fmt_key(n, key[n])}")
        labels.append(" ".join(parts))
    return labels


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _zoom(ax: Any, values: list[float], floor: float = 0.0, ceiling: float = 100.0) -> None:
    """y limits around ``values`` (means ± std and teacher lines) with a margin of 10 % of their span (at least
    one point), kept within [floor, ceiling]."""
    if not values:
        return
    low, high = min(values), max(values)
    margin = max(0.1 * (high - low), 1.0)
    ax.set_ylim(max(floor, low - margin), min(ceiling, high + margin))


def _teacher_hlines(ax: Any, ref: dict[str, float]) -> list[float]:
    for key, text, style in TEACHER_LINES:
        if key in ref:
            ax.axhline(ref[key], color="dimgray", linestyle=style, linewidth=1.2, label=f"{text} {ref[key]:.1f}",
                       gid=f"teacher:{key}")
            ax.text(0.995, ref[key], f"{ref[key]:.1f}", transform=ax.get_yaxis_transform(), ha="right",
                    va="bottom", fontsize=6, color="dimgray")
    return list(ref.values())


def _save(fig: Any, png_path: str | Path) -> Path:
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _budget_title(budget: Any, runs: list[dict[str, Any]]) -> str:
    """A panel's title: the label budget, as labelled images when every run segments (labels_per_class is then
    the number of labelled masks)."""
    unit = "labelled images" if _tasks(runs) == ["segment"] else "labels/class"
    return f"{_fmt_key('labels_per_class', budget)} {unit}"


def comparison_figure(runs: list[dict[str, Any]], teacher_eval: list[dict[str, Any]] | None = None) -> Any:
    """The comparison chart as a matplotlib Figure: one panel per label budget, one bar per configuration
    (colour = configuration, named in the legend; the same colour in every panel), the mean test top-1 (test
    mIoU when every run segments) with the sample std over seeds as error bars, the teacher's kNN and linear
    probe of that budget as horizontal lines, and y zoomed to the bars and lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    _, groups = group_runs(runs)
    metric, what = _metric(runs)
    budgets = _budget_order(g["key"].get("labels_per_class") for g in groups)
    names = _config_labels([g["key"] for g in groups])
    configs = list(dict.fromkeys(names))
    number = {c: i + 1 for i, c in enumerate(configs)}
    colour = dict(zip(configs, _colours(len(configs))))
    per_panel = max(sum(_budget(g["key"].get("labels_per_class")) == b for g in groups) for b in budgets)
    fig = Figure(figsize=(len(budgets) * max(3.0, 0.32 * per_panel + 1.2) + 4.3, 4.6), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(budgets), squeeze=False)[0]
    for ax, budget in zip(axes, budgets):
        mine = [(g, n) for g, n in zip(groups, names) if _budget(g["key"].get("labels_per_class")) == budget]
        means = [g["stats"][metric][0] for g, _ in mine]
        stds = [g["stats"][metric][1] or 0.0 for g, _ in mine]
        xs = np.arange(len(mine))
        heights = [m if m is not None else 0.0 for m in means]
        ax.bar(xs, heights, color=[colour[n] for _, n in mine], edgecolor="black", linewidth=0.5)
        ax.errorbar(xs, heights, yerr=stds, fmt="none", ecolor="black", capsize=3, linewidth=1)
        for x, m, sd in zip(xs, means, stds):
            ax.annotate("n/a" if m is None else f"{m:.1f}", (x, (m or 0.0) + sd), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=6)
        shown = [m + sd for m, sd in zip(heights, stds)] + [m - sd for m, sd in zip(heights, stds)]
        shown += _teacher_hlines(ax, teacher_reference(teacher_eval, budget))
        _zoom(ax, shown)
        ax.set_xticks(xs)  # the configuration's number in the legend
        ax.set_xticklabels([str(number[n]) for _, n in mine], fontsize=7)
        ax.set_title(_budget_title(budget, runs), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"{what} (%)")
    handles = [Patch(facecolor=colour[c], edgecolor="black", linewidth=0.5, label=f"{number[c]}: {c}")
               for c in configs]
    lines = {t.get_label(): t for ax in axes for t in ax.get_lines() if str(t.get_gid()).startswith("teacher:")}
    for key, text, style in TEACHER_LINES:  # one legend entry per line style (the values are in each panel)
        if any(k.startswith(text + " ") for k in lines):
            from matplotlib.lines import Line2D

            handles.append(Line2D([], [], color="dimgray", linestyle=style, label=text))
    width = fig.get_figwidth()
    right = 1 - 4.2 / width
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(right + 0.005, 0.5), fontsize=6.5,
               frameon=False)
    fig.suptitle(f"{what} per configuration (mean ± std over seeds)", fontsize=9)
    fig.tight_layout(rect=(0, 0, right, 0.95))
    return fig


def plot_runs(runs: list[dict[str, Any]], png_path: str | Path,
              teacher_eval: list[dict[str, Any]] | None = None) -> Path:
    """:func:`comparison_figure` written to ``png_path`` as PNG (the Agg canvas: no pyplot, no global backend)."""
    return _save(comparison_figure(runs, teacher_eval), png_path)


def _sweep_key(name: str) -> str:
    key = SWEEP_ALIASES.get(name, name)
    if key not in GROUP_KEYS + OPTIONAL_KEYS:
        known = sorted(set(GROUP_KEYS + OPTIONAL_KEYS) | set(SWEEP_ALIASES))
        raise TcskdError(f"unknown sweep key '{name}' (choose {', '.join(known)})")
    return key


def sweep_figure(runs: list[dict[str, Any]], x: str = "dim", series: str = "basis_kind",
                 teacher_eval: list[dict[str, Any]] | None = None, split: str = "val") -> Any:
    """Top-1 on ``split`` (val by default: the held-out rows settings are chosen on; test; mIoU when every run
    segments) against ``x``: one line per value of ``series`` with the
    sample std over seeds as error bars. With ``x`` = labels per class (a few-shot curve) there is one panel
    and the teacher's kNN and linear probe are lines over the budgets; otherwise one panel per label budget,
    each with its teacher's lines. TcskdError (one line) when the runs of one line differ in anything but
    ``x`` and the label budget (and the basis name), or when ``x`` is not a number."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x, series = _sweep_key(x), _sweep_key(series)
    if x == series:
        raise TcskdError(f"the sweep's x and series are the same key ({x})")
    free = {x, "labels_per_class", "basis", *_RUN_ONLY}
    for name in dict.fromkeys(_fmt_key(series, r.get(series)) for r in runs):
        line = [r for r in runs if _fmt_key(series, r.get(series)) == name]
        other = [k for k in ("method", "basis_kind", "dim") + OPTIONAL_KEYS if k not in free and _varies(line, k)]
        if other:
            raise TcskdError(f"a sweep of {x}: the runs of {series} {name} also differ in {', '.join(other)}; "
                             f"give runs that differ only in {x} along each line")
    curve = x == "labels_per_class"
    points = [r for r in runs if not curve or _budget(r.get("labels_per_class")) is not None]
    if curve and len(points) < len(runs):
        log.info("the curve leaves out %d run(s) with every label (no number of labels per class)",
                 len(runs) - len(points))
    if not points or any(_num(r.get(x)) is None for r in points):
        raise TcskdError(f"a sweep needs a number for {x} in every run")
    metric, what = _metric(points, split)
    budgets = [None] if curve else _budget_order(r.get("labels_per_class") for r in points)
    names = list(dict.fromkeys(_fmt_key(series, r.get(series)) for r in points))
    colour = dict(zip(names, _colours(len(names))))
    fig = Figure(figsize=(max(5.0, 4.0 * len(budgets)), 4.2), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(budgets), squeeze=False)[0]
    for ax, budget in zip(axes, budgets):
        mine = points if curve else [r for r in points if _budget(r.get("labels_per_class")) == budget]
        shown: list[float] = []
        for name in names:
            line = [r for r in mine if _fmt_key(series, r.get(series)) == name]
            xs = sorted({_num(r[x]) for r in line})
            stats = [mean_std(100 * _num(r.get(metric)) if _num(r.get(metric)) is not None else None
                              for r in line if _num(r[x]) == v) for v in xs]
            keep = [(v, m, sd or 0.0) for v, (m, sd, _) in zip(xs, stats) if m is not None]
            if not keep:
                continue
            vx, vm, vs = map(list, zip(*keep))
            ax.errorbar(vx, vm, yerr=vs, marker="o", capsize=3, color=colour[name],
                        label=name if series in ("method", "basis_kind") else f"{HEADERS.get(series, series)}={name}")
            shown += [m + sd for m, sd in zip(vm, vs)] + [m - sd for m, sd in zip(vm, vs)]
        if curve:
            xs = _budget_order(e.get("labels_per_class") for e in teacher_eval or [])
            xs = [b for b in xs if b is not None]
            for key, text, style in TEACHER_LINES:
                ys = [teacher_reference(teacher_eval, b, split).get(key) for b in xs]
                pts = [(b, y) for b, y in zip(xs, ys) if y is not None]
                if pts:
                    ax.plot([b for b, _ in pts], [y for _, y in pts], color="dimgray", linestyle=style,
                            marker=".", label=text, gid=f"teacher:{key}")
                    shown += [y for _, y in pts]
            ax.set_title("few-shot: labels per class", fontsize=9)
        else:
            shown += _teacher_hlines(ax, teacher_reference(teacher_eval, budget, split))
            ax.set_title(_budget_title(budget, points), fontsize=9)
        values = sorted({_num(r[x]) for r in mine})
        if values[0] > 0 and values[-1] / values[0] >= 8:  # K or labels per class over orders of magnitude
            ax.set_xscale("log", base=2 if x == "dim" else 10)
        ax.set_xticks(values)
        ax.set_xticklabels([f"{v:g}" for v in values], fontsize=7)
        ax.minorticks_off()
        _zoom(ax, shown)
        ax.set_xlabel(HEADERS.get(x, x) if x != "dim" else "K (coordinates)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"{what} (%)")
    fig.suptitle(f"{what} against {'K' if x == 'dim' else HEADERS.get(x, x)} (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    return fig


def kept_ranks_figure(runs: list[dict[str, Any]], top: int = 64) -> Any:
    """Which coordinates tailoring kept, epoch by epoch: one panel per configuration and label budget (its
    first seed; the others in the title's count), x = epochs done, y = the coordinate's rank in the basis (0 =
    the leading principal direction), a dot for each active coordinate (``kept_ranks`` of final.json). The
    title gives, over the configuration's seeds, how many of the finally kept coordinates are among the
    leading ``top``. TcskdError (one line) when no run records a schedule that changed its coordinates."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _, groups = group_runs(runs)
    tailored = [g for g in groups if any(len((r.get("kept_ranks") or {}).get("epoch") or []) > 1 for r in g["runs"])]
    if not tailored:
        raise TcskdError("no run among these tailored its coordinates (final.json's kept_ranks has one entry)")
    firsts = [sorted(g["runs"], key=lambda r: str(r.get("seed")))[0] for g in tailored]
    names = [f"{r.get('method')} {r.get('basis_kind') or ''} {r.get('tailoring')}, classifier on "
             f"{r.get('classify_from')}" for r in firsts]
    cols = min(3, len(tailored))
    rows = -(-len(tailored) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, g, name, first in zip(axes, tailored, names, firsts):
        kept = first["kept_ranks"]
        epochs = list(kept["epoch"]) + [int(first.get("epochs") or kept["epoch"][-1] + 1)]
        for e0, ranks in zip(epochs[:-1], kept["ranks"]):
            ax.scatter(np.full(len(ranks), e0), ranks, s=1.5, color="tab:blue", linewidths=0)
        ax.set_xlim(-0.5, epochs[-1] + 0.5)
        ax.axhline(top - 0.5, color="tab:red", linewidth=0.8, linestyle="--")
        finals = [r.get("final_kept_ranks") or [] for r in g["runs"]]
        lead = [sum(1 for k in f if k < top) for f in finals]
        budget = _fmt_key("labels_per_class", g["key"].get("labels_per_class"))
        ax.set_title(f"{name}, {budget} labels/class\nkept in the leading {top}: "
                     f"{', '.join(f'{n}/{len(f)}' for n, f in zip(lead, finals))}", fontsize=7)
        ax.set_xlabel("epochs done", fontsize=7)
        ax.set_ylabel("rank in the basis (0 = leading)", fontsize=7)
        ax.invert_yaxis()
        ax.tick_params(labelsize=6)
    for ax in axes[len(tailored):]:
        ax.set_visible(False)
    fig.suptitle("coordinates kept by tailoring (dots: active ranks; red: the leading "
                 f"{top})", fontsize=9)
    fig.tight_layout()
    return fig


def plot_kept_ranks(runs: list[dict[str, Any]], png_path: str | Path, top: int = 64) -> Path:
    """:func:`kept_ranks_figure` written to ``png_path`` as PNG."""
    return _save(kept_ranks_figure(runs, top), png_path)


def plot_sweep(runs: list[dict[str, Any]], png_path: str | Path, x: str = "dim", series: str = "basis_kind",
               teacher_eval: list[dict[str, Any]] | None = None, split: str = "val") -> Path:
    """:func:`sweep_figure` written to ``png_path`` as PNG, e.g. ``plot_sweep(runs, "k.png", x="dim",
    series="basis")`` (accuracy against K per basis) or ``x="labels_per_class", series="method"`` (a few-shot
    curve)."""
    return _save(sweep_figure(runs, x, series, teacher_eval, split), png_path)
