"""The ``tcskd bench`` click command: a profile, a few overrides, the JSON and the Markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tcskd.bench.profiles import profile_config
from tcskd.bench.report import render_markdown
from tcskd.bench.run import run_bench
from tcskd.device import DEVICES, resolve_device
from tcskd.errors import TcskdError
from tcskd.options import HELP


@click.command("bench", context_settings=HELP)
@click.option("--device", type=click.Choice(list(DEVICES)), default="auto", show_default=True)
@click.option("--quick", is_flag=True, help="Tiny sizes and fewer repeats: a smoke run.")
@click.option("--out", "out_file", default="bench/out/bench.json", show_default=True,
              help="JSON result; the Markdown table goes beside it (.md).")
@click.option("--profile", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="auto: gpu on CUDA, else cpu.")
@click.option("--repeats", type=int, default=None, help="Measured repeats per figure (default: 3, quick 2).")
@click.option("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
@click.option("--budget", "budget_s", type=float, default=None,
              help="Soft time budget in seconds: optional teachers are skipped beyond it.")
@click.option("--cache-workers", type=int, default=None,
              help="DataLoader workers of the cache runs (default: 0 on the CPU, min(8, cores) on CUDA).")
@click.option("--train-workers", type=int, default=None,
              help="DataLoader workers of the training runs (default: tcskd train's own).")
@click.option("--workdir", default=None, help="Keep caches and runs here (default: a temporary folder).")
def bench_cmd(device: str, quick: bool, out_file: str, profile: str, repeats: int | None, threads: int | None,
              budget_s: float | None, cache_workers: int | None, train_workers: int | None,
              workdir: str | None) -> None:
    """Measure each stage against its reference (cache vs forward, basis vs read, tcs vs ce/online)."""
    dev = resolve_device(device)
    prof = profile if profile != "auto" else ("gpu" if dev.type == "cuda" else "cpu")
    over: dict[str, Any] = {}
    if repeats is not None:
        if repeats < 1:
            raise TcskdError(f"--repeats must be >= 1 (got {repeats})")
        over["repeats"] = repeats
    if threads is not None:
        over["threads"] = threads
    if budget_s is not None:
        over["budget_s"] = budget_s
    if workdir is not None:
        over["workdir"] = workdir
    if cache_workers is not None:
        over["cache_workers"] = cache_workers
    if train_workers is not None:
        over["train_workers"] = train_workers
    cfg = profile_config(prof, dev.type, quick, **over)
    out = Path(out_file)
    res = run_bench(cfg, out, echo=lambda m: click.echo(f"bench: {m}", err=True))
    click.echo(render_markdown(res))
    click.echo(f"wrote {out} and {out.with_suffix('.md')}", err=True)
