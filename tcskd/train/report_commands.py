"""``tcskd eval`` and ``tcskd report``: thin click layers over evaluate.py and report.py.

Registered in tcskd/cli.py with ``main.add_command(eval_cmd)`` and
``main.add_command(report_cmd)``. Problems are raised as TcskdError, which
the main group prints as one line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

log = logging.getLogger(__name__)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


@click.command("eval")
@click.option("--cache", "cache_ref", required=True, help="Train cache: key, key prefix or directory.")
@click.option("--test-cache", "test_ref", required=True, help="Test cache of the same teacher: key or directory.")
@click.option("--k", type=int, default=20, show_default=True, help="Neighbours of the weighted kNN.")
@click.option("--temperature", type=float, default=0.07, show_default=True, help="kNN vote weight exp(sim/T).")
@click.option("--linear/--no-linear", default=True, show_default=True, help="Also fit a linear probe.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--cache-root", type=str, default=None,
              help="Default: $TCSKD_CACHE, else ./caches.")
@click.option("--labels-per-class", type=int, default=None,
              help="References: n labelled training rows per class, as tcskd train (default: every label).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the labelled subset (as tcskd train --seed) and of the probe.")
@click.option("--val-frac", type=float, default=0.1, show_default=True,
              help="Validation share of each class of the train cache, held out as in tcskd train.")
@click.option("--val-per-class", type=int, default=None, help="Validation rows per class instead of --val-frac.")
@click.option("--val-seed", type=int, default=0, show_default=True, help="Seed of the validation split.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the result as JSON here.")
def eval_cmd(cache_ref: str, test_ref: str, k: int, temperature: float, linear: bool, device: str,
             cache_root: str | None, labels_per_class: int | None, seed: int, val_frac: float,
             val_per_class: int | None, val_seed: int, out: str | None) -> None:
    """The teacher's kNN / linear-probe top-1 from cached features (no teacher forward).

    Uses view 0 of the train and test caches; rows marked bad (row_ok False)
    and unlabelled rows are left out. The validation rows of the train cache
    are held out exactly as tcskd train holds them out, and with
    --labels-per-class the references are the n rows per class a run with the
    same --seed is given.
    """
    from tcskd.train.evaluate import EvalConfig, evaluate_teacher

    res = evaluate_teacher(EvalConfig(cache=cache_ref, test_cache=test_ref, k=k, temperature=temperature,
                                      linear=linear, device=device, cache_root=cache_root, out=out,
                                      labels_per_class=labels_per_class, seed=seed, val_frac=val_frac,
                                      val_per_class=val_per_class, val_seed=val_seed))
    rows = [
        ("teacher", str(res["teacher"])),
        ("data", str(res["data"]) + ("" if res.get("test_data") in (None, res["data"])
                                     else f" / test: {res['test_data']}")),
        ("rows", f"{res['train_rows']} labelled train / {res['val_rows']} val / {res['test_rows']} test, "
                 f"dim {res['dim']}"),
        (f"kNN top-1 (k={res['k']}, T={res['temperature']:g})",
         f"val {_pct(res['val_knn_top1'])}, test {_pct(res['knn_top1'])}"),
        ("linear probe top-1", f"val {_pct(res['val_linear_top1'])}, test {_pct(res['linear_top1'])}"),
    ]
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        click.echo(f"{a.ljust(width)}  {b}")
    if out:
        click.echo(f"wrote {out}", err=True)


def _default_png(run_dirs: list[Path]) -> Path:
    """report.png in the common parent of the run dirs, or in the cwd when that is not writable."""
    try:
        parent = Path(os.path.commonpath([str(d.resolve().parent) for d in run_dirs]))
    except ValueError:
        parent = Path.cwd()
    if not os.access(parent, os.W_OK):
        parent = Path.cwd()
    return parent / "report.png"


@click.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--teacher-eval", type=click.Path(dir_okay=False), multiple=True,
              help="JSON from `tcskd eval --out`, shown above the table (repeatable: label budgets, seeds).")
@click.option("--png", type=click.Path(dir_okay=False), default=None,
              help="Chart file (default: report.png in the run dirs' common parent).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the Markdown here.")
def report_cmd(run_dirs: tuple[str, ...], teacher_eval: tuple[str, ...], png: str | None, out: str | None) -> None:
    """Compare finished runs: Markdown table on stdout, bar chart as PNG.

    RUN_DIR... are run directories (globs welcome; a directory of run
    directories also works). Directories without final.json are skipped.
    """
    from tcskd.errors import TcskdError
    from tcskd.train.report import expand_run_dirs, load_runs, load_teacher_eval, markdown_table, plot_runs

    found, skipped = expand_run_dirs(run_dirs)
    for p in skipped:
        why = "no final.json" if p.exists() else "no such directory"
        click.echo(f"tcskd: warning: skipping {p}: {why}", err=True)
    if not found:
        raise TcskdError(f"none of the {len(run_dirs)} path(s) given is a finished run (no final.json)")
    teacher = [load_teacher_eval(p) for p in teacher_eval] or None
    runs = load_runs(found)
    table = markdown_table(runs, teacher)
    click.echo(table, nl=False)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table)
        click.echo(f"wrote {out}", err=True)
    png_path = plot_runs(runs, Path(png) if png else _default_png([Path(r["run_dir"]) for r in runs]), teacher)
    click.echo(str(png_path), err=True)


__all__ = ["eval_cmd", "report_cmd"]
