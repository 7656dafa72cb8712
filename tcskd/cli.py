"""The ``tcskd`` command: a thin click layer over the stage functions.

Every user-facing problem is a ``TcskdError``: printed as one line on stderr
with a non-zero exit (no traceback unless ``--debug``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import IO, Any

import click

from tcskd import __version__
from tcskd.errors import TcskdError

log = logging.getLogger(__name__)

DEVICE = click.Choice(["auto", "cpu", "cuda"])


# click >= 8.2 signals "no arguments: show the help" with a UsageError subclass; that one stays as it is.
_NO_ARGS_IS_HELP: tuple[type[Exception], ...] = tuple(
    c for c in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if c is not None)


class _UsageLine(click.UsageError):
    """A click usage error shown the house way: one ``tcskd: error:`` line on stderr, exit 2."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"tcskd: error: {self.message}", file=file, err=True)


def _one_line(e: click.UsageError) -> click.UsageError:
    """``e`` as a ``_UsageLine`` with click's message flattened to one line (help requests stay as they are)."""
    if isinstance(e, (_UsageLine, *_NO_ARGS_IS_HELP)):
        return e
    msg = " ".join(line.strip() for line in e.format_message().splitlines() if line.strip())
    return _UsageLine(msg or type(e).__name__, e.ctx)


class _Group(click.Group):
    """Turns TcskdError, OS errors and click's usage errors into one line and an exit code."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise _one_line(e) from e

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _one_line(e) from e
        except (TcskdError, OSError) as e:
            if ctx.find_root().params.get("debug"):
                raise
            code = getattr(e, "exit_code", 2)
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            click.echo(f"tcskd: error: {msg}", err=True)
            ctx.exit(code)
        except KeyboardInterrupt:
            click.echo("tcskd: interrupted; what was finished is kept: run the same command again to resume "
                       "(for train: add --resume --out RUN_DIR)", err=True)
            ctx.exit(130)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("matplotlib", "PIL", "h5py", "numcodecs", "zarr", "asyncio", "urllib3", "filelock", "faiss",
                  "faiss.loader", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tcskd")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch (default: $TCSKD_THREADS, else torch's own choice). "
                   "On a busy or small machine 1 can be much faster.")
def main(debug: bool, verbose: int, quiet: bool, threads: int | None) -> None:
    """tcskd: distil a large teacher into small students from cached features."""
    from tcskd.device import set_threads

    _setup_logging(verbose, quiet)
    set_threads(threads)


# -- stage 1: cache ---------------------------------------------------------

@main.group("cache", cls=_Group, invoke_without_command=True)
@click.option("--data", default="builtin:mnist5k", show_default=True, help="Dataset spec.")
@click.option("--teacher", default="builtin:efficientnet-lite0", show_default=True, help="Teacher spec.")
@click.option("--split", type=click.Choice(["train", "test", "all"]), default="train", show_default=True)
@click.option("--views", type=int, default=1, show_default=True, help="Views per image (0: centre crop; others random crop+flip).")
@click.option("--image-size", type=int, default=None, help="Teacher input size (default: the teacher's).")
@click.option("--batch-size", type=int, default=None, help="Default: 32 on the CPU, 256 on a GPU.")
@click.option("--format", "fmt", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True)
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--cache-root", type=str, default=None, help="Default: $TCSKD_CACHE, else ./caches.")
@click.option("--limit", type=int, default=None, help="A seeded (--seed), class-stratified subset of N samples of the split, in source order.")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random views.")
@click.option("--chunk-rows", type=int, default=1024, show_default=True, help="Rows per chunk (unit of resume).")
@click.option("--skip-bad", is_flag=True, help="Record unreadable images in the manifest instead of stopping.")
@click.option("--wait", is_flag=True, help="Wait for another writer of the same cache instead of exiting.")
@click.pass_context
def cache(ctx: click.Context, data, teacher, split, views, image_size, batch_size, fmt, dtype, cache_root,
          limit, device, workers, seed, chunk_rows, skip_bad, wait) -> None:
    """Stream a dataset once through a teacher into a feature store.

    Prints the cache's path as the last line on stdout. Subcommands: ls, info, verify.
    """
    if ctx.invoked_subcommand is not None:
        return
    from tcskd.cache.build import CacheConfig, build_cache

    cfg = CacheConfig(data=data, teacher=teacher, split=split, views=views, image_size=image_size,
                      batch_size=batch_size, format=fmt, dtype=dtype, cache_root=cache_root, limit=limit,
                      device=device, workers=workers, seed=seed, chunk_rows=chunk_rows, skip_bad=skip_bad,
                      wait=wait)
    res = build_cache(cfg)
    if res.hit:
        log.info("cache hit (nothing recomputed)")
    else:
        log.info("computed %d rows in %.1f s", res.rows_computed, res.seconds)
    click.echo(str(res.path))


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cache.command("ls")
@click.option("--cache-root", type=str, default=None)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per cache.")
def cache_ls(cache_root, as_json) -> None:
    """List the caches under the cache root."""
    from tcskd.cache.registry import WriterLock, list_caches
    from tcskd.cache.store import as_location

    rows = list_caches(cache_root)
    for r in rows:
        r["writing"] = WriterLock.is_held(as_location(r["path"]))
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    head = ("key", "data", "split", "teacher", "rows", "dim", "views", "fmt", "size", "state", "bases")
    table = [head]
    for r in rows:
        state = "error" if r.get("error") else ("complete" if r["complete"] else
                                                f"{'writing' if r['writing'] else 'partial'} {r['chunks_done']}")
        table.append((r["key"], str(r["data"]), str(r["split"]), str(r["teacher"]), str(r["rows"]), str(r["dim"]),
                      str(r["views"]), str(r["format"]), _human(r["size_bytes"]), state, ",".join(r["bases"]) or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if not rows:
        click.echo("(no caches)", err=True)


@cache.command("info")
@click.argument("cache_ref")
@click.option("--cache-root", type=str, default=None)
def cache_info(cache_ref, cache_root) -> None:
    """Print a cache's manifest (and its bases) as JSON."""
    from tcskd.cache.registry import resolve_cache
    from tcskd.cache.verify import info

    click.echo(json.dumps(info(resolve_cache(cache_ref, cache_root)), indent=2, sort_keys=True))


@cache.command("verify")
@click.argument("cache_ref")
@click.option("--recompute", type=int, default=0, show_default=True, help="Rows to recompute with the teacher.")
@click.option("--cache-root", type=str, default=None)
@click.option("--device", type=DEVICE, default="auto", show_default=True)
def cache_verify(cache_ref, recompute, cache_root, device) -> None:
    """Check completeness, shapes, NaN/Inf, labels, and recomputed rows; non-zero exit on a problem."""
    from tcskd.cache.registry import resolve_cache
    from tcskd.cache.verify import VerifyFailed, verify_cache

    rep = verify_cache(resolve_cache(cache_ref, cache_root), recompute=recompute, device=device)
    for p in rep.problems:
        click.echo(f"problem: {p}")
    extra = f", {rep.recomputed_rows} recomputed (max rel. error {rep.max_rel_error:.2e})" if rep.recomputed_rows else ""
    if not rep.ok:
        raise VerifyFailed(f"{rep.path}: {len(rep.problems)} problem(s), first: {rep.problems[0]}")
    click.echo(f"ok: {rep.path} ({rep.checked_rows} rows checked{extra})")


def _register() -> None:
    from tcskd.bench.cli import bench_cmd
    from tcskd.subspace.commands import basis
    from tcskd.train.commands import export, train
    from tcskd.train.report_commands import eval_cmd, report_cmd

    for cmd in (basis, train, export, eval_cmd, report_cmd, bench_cmd):
        main.add_command(cmd)


_register()
