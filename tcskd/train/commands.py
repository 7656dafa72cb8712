"""Click commands of stage 3: ``tcskd train`` and ``tcskd export`` (registered in tcskd.cli)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from tcskd.errors import TcskdError

_DEVICE = click.Choice(["auto", "cpu", "cuda"])
# click option name -> TrainConfig field where they differ
_FIELD = {"lambda_": "lam"}


@click.command("train")
@click.option("--cache", default=None, help="Train cache: key, key prefix or directory.")
@click.option("--basis", default="pca", show_default=True, help="Basis name in the cache.")
@click.option("--student", default="cnn", show_default=True,
              help="cnn, resnet8x4, resnet20, resnet32x4, resnet56, wrn-16-2, wrn-40-2, mobilenetv2, "
                   "shufflenetv2, tv:NAME or python:MODULE:FACTORY.")
@click.option("--method", type=click.Choice(["tcs", "fitnet", "ce", "online"]), default="tcs", show_default=True)
@click.option("--dim", type=int, default=None,
              help="K: first K coordinates of the basis (default: 64, or all when the basis has fewer).")
@click.option("--lambda", "lambda_", type=float, default=10.0, show_default=True,
              help="Weight of the mimic term (10: best of a grid on the built-in default, see README).")
@click.option("--target-norm", type=click.Choice(["global", "none"]), default="global", show_default=True,
              help="global: divide targets by sqrt(mean coordinate variance), so lambda is scale-free.")
@click.option("--mimic", type=click.Choice(["mse", "smooth-l1", "cosine"]), default="mse", show_default=True)
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: 0.05 sgd, 1e-3 adamw).")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--weight-decay", type=float, default=None, help="Default: 5e-4 sgd, 0.05 adamw.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--warmup-epochs", type=float, default=1.0, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "step"]), default="cosine", show_default=True)
@click.option("--labels-per-class", type=int, default=None,
              help="CE (and kNN references) on n labelled training images per class (default: every label).")
@click.option("--val-frac", type=float, default=0.1, show_default=True,
              help="Share of each class of the training split held out for validation (0: none).")
@click.option("--val-per-class", type=int, default=None, help="Hold out n rows per class instead of --val-frac.")
@click.option("--val-seed", type=int, default=0, show_default=True,
              help="Seed of the validation split (the same for every --seed).")
@click.option("--tailor", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Tailoring: on = from 256 coordinates down to 64 by taylor importance, the classifier reading "
                   "the coordinates; off = the first 64 throughout; auto = on with every label, off with "
                   "--labels-per-class (chosen on validation, see README). The options below override parts.")
@click.option("--select-every", type=int, default=None, help="Tailoring period in epochs (0: off).")
@click.option("--drop-frac", type=float, default=None, help="Share of the active coordinates dropped per step.")
@click.option("--min-dim", type=int, default=None, help="Tailoring stops at this many coordinates.")
@click.option("--select-by", type=click.Choice(["grad", "taylor", "error", "worst"]), default=None,
              help="Tailoring importance: |dL/dgate|, first-order loss change (taylor), or the per-coordinate "
                   "relative error dropping the best- (error) or worst-matched (worst) coordinates.")
@click.option("--classify-from", type=click.Choice(["feature", "coords"]), default=None,
              help="The classifier reads the student feature, or the active predicted teacher coordinates.")
@click.option("--elsh-bits", type=int, default=0, show_default=True, help="Bits of the eLSH term (0: off).")
@click.option("--elsh-weight", type=float, default=1.0, show_default=True)
@click.option("--augment", type=click.Choice(["auto", "none", "flip", "crop", "crop-flip"]), default="auto",
              show_default=True, help="Student augmentation with a 1-view cache.")
@click.option("--image-size", type=int, default=None, help="Student input size (default: the data's).")
@click.option("--data", default=None, help="Dataset spec overriding the cache's.")
@click.option("--out", default=None, help="Run directory (default: runs/<method>-<student>-<K>-s<seed>-<time>).")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out (its config.yaml supplies the options not given).")
@click.option("--device", type=_DEVICE, default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=None, help="DataLoader workers (default: 0 on CPU, up to 8 on CUDA).")
@click.option("--cache-root", type=str, default=None)
@click.option("--eval-every", type=int, default=1, show_default=True)
@click.option("--sync-bn", is_flag=True, help="Under torchrun: SyncBatchNorm over all ranks.")
@click.option("--stop-after", type=int, default=None, hidden=True)
@click.pass_context
def train(ctx: click.Context, **opts) -> None:
    """Train a student on cached teacher coordinates; prints the run directory last."""
    from tcskd.train.loop import TrainConfig
    from tcskd.train.loop import train as run_train

    values = {_FIELD.get(k, k): v for k, v in opts.items()}
    if values["resume"] and values["out"]:
        values = _with_saved_config(ctx, values)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in fields})
    res = run_train(cfg)
    if "stopped_after" in res:
        click.echo(f"stopped after epoch {res['stopped_after']}; continue with --resume --out {res['run_dir']}")
        click.echo(res["run_dir"])
        return

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    click.echo(f"{res['method']} {res['student']} K={res['dim']} seed {res['seed']}: val top-1 "
               f"{pct(res['val_top1'])}, test top-1 {pct(res['test_top1'])}, kNN top-1 {pct(res['knn_top1'])}, {res['train_seconds']:.1f} s "
               f"({res['img_per_s'] or 0:.0f} img/s)")
    click.echo(res["run_dir"])


def _with_saved_config(ctx: click.Context, values: dict) -> dict:
    """On --resume: options not given on the command line come from the run's config.yaml."""
    import yaml

    path = Path(values["out"]) / "config.yaml"
    if not path.is_file():
        return values
    saved = yaml.safe_load(path.read_text()) or {}
    out = dict(values)
    for opt, field in ((k, _FIELD.get(k, k)) for k in ctx.params):
        given = ctx.get_parameter_source(opt) == click.core.ParameterSource.COMMANDLINE
        if not given and field in saved and field not in ("resume", "out", "stop_after"):
            out[field] = saved[field]
    return out


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_file", required=True, help="File to write, e.g. student.pt2 (+ FILE.json).")
def export(run_dir: str, out_file: str) -> None:
    """Export a run's student (logits only, the TCS head dropped) as a torch.export program.

    Load it with torch.export.load(FILE).module(); the input is B x C x S x S in [0, 1].
    """
    from tcskd.train.export import export_run

    try:
        path = export_run(run_dir, out_file)
    except FileNotFoundError as e:
        raise TcskdError(str(e)) from e
    click.echo(str(path))
