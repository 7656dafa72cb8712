"""Click commands of stage 3: ``tcskd train``, ``tcskd eval``, ``tcskd export`` and ``tcskd report``.

Thin layers registered in tcskd.cli: the options of ``train`` and ``eval`` are generated from
:class:`tcskd.train.config.TrainConfig` and :class:`~tcskd.train.config.EvalConfig` (tcskd.options), whose
``validate()`` the stage functions call; ``--config FILE`` is read by tcskd.options, and ``--resume`` takes
the options not given from the run's config.yaml the same way (:func:`tcskd.train.config.with_saved_config`).
Problems are raised as TcskdError, which the main group prints as one line.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path

import click

from tcskd.errors import TcskdError
from tcskd.options import HELP, click_options, config_from_params, given_params, read_config_file
from tcskd.train.config import EvalConfig, TrainConfig, resolve_config, table_row, with_saved_config
from tcskd.train.evaluate import evaluate_teacher
from tcskd.train.export import FORMATS, export_run
from tcskd.train.loop import train as run_train
from tcskd.train.report import (expand_run_dirs, load_runs, load_teacher_eval, markdown_table, plot_kept_ranks,
                                 plot_runs, plot_sweep, teacher_eval_files)

log = logging.getLogger(__name__)

@click.command("train", context_settings=HELP)
@click_options(TrainConfig)
@click.option("--print-config", is_flag=True,
              help="Print the resolved options that define the run's row of tcskd report (JSON) and stop; "
                   "the cache is not opened.")
@click.option("--print-configs", type=click.Path(dir_okay=False), default=None, hidden=True,
              help="FILE of lines NAME<TAB>options of tcskd train: print NAME<TAB>--print-config's JSON for each "
                   "line (one process for a whole grid) and stop.")
@click.pass_context
def train(ctx: click.Context, print_config: bool, print_configs: str | None, **params) -> None:
    """Train a student on cached teacher coordinates; prints the run directory last."""
    if print_configs is not None:
        for line in Path(print_configs).read_text().splitlines():
            if line.strip():
                name, _, args = line.partition("\t")
                click.echo(f"{name}\t{json.dumps(_resolved_row(shlex.split(args)))}")
        return
    cfg = _config(ctx, params)
    if print_config:
        click.echo(json.dumps(table_row(resolve_config(cfg))))
        return
    res = run_train(cfg)
    if "stopped_after" in res:
        click.echo(f"stopped after epoch {res['stopped_after']}; continue with --resume --out {res['run_dir']}")
        click.echo(res["run_dir"])
        return

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    if res.get("task") == "segment":
        scores = (f"val mIoU {pct(res['val_miou'])}, test mIoU {pct(res['test_miou'])}, test pixel accuracy "
                  f"{pct(res['test_pixel_acc'])}")
    else:
        scores = (f"val top-1 {pct(res['val_top1'])}, test top-1 {pct(res['test_top1'])}, kNN top-1 "
                  f"{pct(res['knn_top1'])}")
    click.echo(f"{res['method']} {res['student']} K={res['dim']} seed {res['seed']}: {scores}, "
               f"{res['train_seconds']:.1f} s ({res['img_per_s'] or 0:.0f} img/s)")
    click.echo(res["run_dir"])


def _config(ctx: click.Context, params: dict) -> TrainConfig:
    """The TrainConfig of a ``tcskd train`` command line (``--config`` and ``--resume`` applied)."""
    cfg = config_from_params(TrainConfig, params, ctx)
    given = given_params(ctx)
    if params["config"] is not None:  # the --config file's values count as given: they beat the run's own
        given |= set(read_config_file(TrainConfig, params["config"]))
    return with_saved_config(cfg, given)


def _resolved_row(args: list[str]) -> dict:
    """:func:`table_row` of the resolved config that ``tcskd train ARGS`` would train."""
    with train.make_context("train", list(args)) as sub:
        return table_row(resolve_config(_config(sub, sub.params)))


#: How ``tcskd eval`` says where the probe's weight decay came from.
_WD_SOURCE = {"val": "chosen on val", "given": "given", "default": "default: no val rows"}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f} %"


@click.command("eval", context_settings=HELP)
@click_options(EvalConfig)
def eval_cmd(**params) -> None:
    """The teacher's kNN / linear-probe top-1 from cached features (no teacher forward).

    Uses view 0 of the train and test caches; rows marked bad (row_ok False)
    and unlabelled rows are left out. The validation rows of the train cache
    are held out exactly as tcskd train holds them out, and with
    --labels-per-class the references are the n rows per class a run with the
    same --seed is given.
    """
    res = evaluate_teacher(config_from_params(EvalConfig, params))
    rows = [
        ("teacher", str(res["teacher"])),
        ("data", str(res["data"]) + ("" if res.get("test_data") in (None, res["data"])
                                     else f" / test: {res['test_data']}")),
        ("rows", f"{res['train_rows']} labelled train / {res['val_rows']} val / {res['test_rows']} test, "
                 f"dim {res['dim']}"),
        (f"kNN top-1 (k={res['k']}, T={res['temperature']:g})",
         f"val {_pct(res['val_knn_top1'])}, test {_pct(res['knn_top1'])}"),
        (f"linear probe top-1 (wd {res['probe_wd']:g}, {_WD_SOURCE[res['probe_wd_source']]})"
         if res.get("probe_wd") is not None else "linear probe top-1",
         f"val {_pct(res['val_linear_top1'])}, test {_pct(res['linear_top1'])}"),
    ]
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        click.echo(f"{a.ljust(width)}  {b}")
    if params["out"]:
        click.echo(f"wrote {params['out']}", err=True)


@click.command("export", context_settings=HELP)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_file", required=True, help="File to write, e.g. student.pt2 (+ FILE.json).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="pt2 (torch.export) or onnx; default: from the --out suffix (.onnx, else pt2).")
def export(run_dir: str, out_file: str, fmt: str | None) -> None:
    """Export a run's student (logits only, the TCS head dropped) as a torch.export program or ONNX.

    Load a .pt2 with torch.export.load(FILE).module(), an .onnx with onnxruntime.InferenceSession(FILE);
    the input is B x C x S x S in [0, 1].
    """
    try:
        path = export_run(run_dir, out_file, fmt)
    except FileNotFoundError as e:
        raise TcskdError(str(e)) from e
    click.echo(str(path))


def _default_png(run_dirs: list[Path]) -> Path:
    """report.png in the common parent of the run dirs, or in the cwd when that is not writable."""
    try:
        parent = Path(os.path.commonpath([str(d.resolve().parent) for d in run_dirs]))
    except ValueError:
        parent = Path.cwd()
    if not os.access(parent, os.W_OK):
        parent = Path.cwd()
    return parent / "report.png"


@click.command("report", context_settings=HELP)
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--teacher-eval", type=click.Path(dir_okay=False), multiple=True,
              help="JSON from `tcskd eval --out`, shown above the table (repeatable: label budgets, seeds; a "
                   "quoted glob such as 'runs/x/teacher-*.json' stands for every file it matches).")
@click.option("--png", type=click.Path(dir_okay=False), default=None,
              help="Chart file (default: report.png in the run dirs' common parent).")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the Markdown here.")
@click.option("--sweep", default=None, metavar="KEY",
              help="Chart top-1 against KEY (e.g. dim, labels_per_class: a few-shot curve) instead of bars.")
@click.option("--series", default="basis", show_default=True, metavar="KEY",
              help="With --sweep: one line per value of KEY (e.g. basis, method).")
@click.option("--split", "split", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="With --sweep: the split charted (val: the held-out rows settings are read off).")
@click.option("--kept", type=click.Path(dir_okay=False), default=None,
              help="Also chart which coordinates tailoring kept, epoch by epoch (the tailored runs among these).")
@click.option("--cost", is_flag=True,
              help="Add the cost columns: training s/epoch, the run's wall time, peak memory over its imports.")
def report_cmd(run_dirs: tuple[str, ...], teacher_eval: tuple[str, ...], png: str | None, out: str | None,
               sweep: str | None, series: str, split: str, kept: str | None, cost: bool) -> None:
    """Compare finished runs: Markdown table on stdout, chart as PNG (bars per label budget, or with --sweep
    a line per --series against KEY).

    RUN_DIR... are run directories (globs welcome; a directory of run
    directories also works). Directories without final.json are skipped.
    """
    found, skipped = expand_run_dirs(run_dirs)
    for p in skipped:
        why = "no final.json" if p.exists() else "no such directory"
        click.echo(f"tcskd: warning: skipping {p}: {why}", err=True)
    if not found:
        raise TcskdError(f"none of the {len(run_dirs)} path(s) given is a finished run (no final.json)")
    teacher = [load_teacher_eval(p) for p in teacher_eval_files(teacher_eval)] or None
    runs = load_runs(found)
    table = markdown_table(runs, teacher, cost=cost)
    click.echo(table, nl=False)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(table)
        click.echo(f"wrote {out}", err=True)
    path = Path(png) if png else _default_png([Path(r["run_dir"]) for r in runs])
    png_path = (plot_sweep(runs, path, sweep, series, teacher, split) if sweep
                else plot_runs(runs, path, teacher))
    click.echo(str(png_path), err=True)
    if kept:
        click.echo(str(plot_kept_ranks(runs, kept)), err=True)


__all__ = ["train", "eval_cmd", "export", "report_cmd"]
