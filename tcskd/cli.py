"""The ``tcskd`` command: a thin click layer over the stage functions.

The options of ``cache``, ``basis``, ``train`` and ``eval`` are generated from
the stages' config dataclasses (tcskd.options, tcskd/*/config.py); the stage
functions validate them. Every user-facing problem is a
``TcskdError``: printed as one line on stderr with a non-zero exit (no
traceback unless ``--debug``); click's usage errors become one line with exit 2.

``tcskd cache`` is both the build command and the group of ``ls``, ``info``
and ``verify``: build options given before a subcommand
(``tcskd cache --data X ls``) are a usage error instead of being ignored.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import IO, Any

import click
from click.core import ParameterSource

from tcskd import __version__
from tcskd.bench.cli import bench_cmd
from tcskd.cache.build import build_cache
from tcskd.cache.config import CacheConfig
from tcskd.cache.verify import VerifyFailed, info, verify_cache
from tcskd.device import set_threads
from tcskd.errors import TcskdError
from tcskd.options import CONFIG, HELP, click_options, config_from_params, option_names
from tcskd.recipe import load_recipe, run_recipe
from tcskd.store.paths import as_location
from tcskd.store.registry import WriterLock, list_caches, resolve_cache
from tcskd.subspace.commands import basis
from tcskd.train.commands import eval_cmd, export, report_cmd, train

log = logging.getLogger(__name__)

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
        except Exception as e:  # an object store's client failing mid-run (connection lost, access denied)
            if ctx.find_root().params.get("debug") or type(e).__module__.split(".")[0] not in _REMOTE_CLIENTS:
                raise
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            click.echo(f"tcskd: error: remote storage: {msg} (what was finished is kept: run the same command "
                       f"again to resume)", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("tcskd: interrupted; what was finished is kept: run the same command again to resume "
                       "(for train: add --resume --out RUN_DIR)", err=True)
            ctx.exit(130)


#: Packages whose exceptions come from remote storage (s3fs and what it runs on): reported in one line.
_REMOTE_CLIENTS = {"botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google"}


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("matplotlib", "PIL", "h5py", "numcodecs", "zarr", "asyncio", "urllib3", "filelock", "faiss",
                  "faiss.loader", "fsspec", "botocore", "aiobotocore", "s3fs", "datasets", "webdataset"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(cls=_Group, context_settings=HELP)
@click.version_option(__version__, prog_name="tcskd")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch (default: $TCSKD_THREADS, else torch's own choice). "
                   "On a busy or small machine 1 can be much faster.")
def main(debug: bool, verbose: int, quiet: bool, threads: int | None) -> None:
    """tcskd: distil a large teacher into small students from cached features."""
    _setup_logging(verbose, quiet)
    set_threads(threads)


# -- stage 1: cache ---------------------------------------------------------

@main.group("cache", cls=_Group, invoke_without_command=True)
@click_options(CacheConfig)
@click.pass_context
def cache(ctx: click.Context, **params) -> None:
    """Stream a dataset once through a teacher into a feature store.

    Prints the cache's path as the last line on stdout. Subcommands: ls, info, verify.
    """
    if ctx.invoked_subcommand is not None:
        _refuse_build_options(ctx)
        return
    res = build_cache(config_from_params(CacheConfig, params))
    if res.hit:
        log.info("cache hit (nothing recomputed)")
    else:
        log.info("computed %d rows in %.1f s", res.rows_computed, res.seconds)
    click.echo(str(res.path))


def _refuse_build_options(ctx: click.Context) -> None:
    """A usage error for build options given to the group before a subcommand (``tcskd cache --data X ls``),
    which would otherwise be ignored without a word."""
    names = {**option_names(CacheConfig), CONFIG: "--config"}
    given = [names[p] for p in ctx.params if ctx.get_parameter_source(p) is ParameterSource.COMMANDLINE]
    if given:
        sub = ctx.invoked_subcommand
        what = f"{given[0]} is an option" if len(given) == 1 else f"{', '.join(given)} are options"
        raise click.UsageError(f"{what} of building a cache, not of 'tcskd cache {sub}': give {sub}'s own "
                               f"options after it (see tcskd cache {sub} --help)", ctx)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cache.command("ls")
@click_options(CacheConfig, only=["cache_root"])
@click.option("--json", "as_json", is_flag=True, help="One JSON object per cache.")
def cache_ls(cache_root: str | None, as_json: bool) -> None:
    """List the caches under the cache root."""
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
@click_options(CacheConfig, only=["cache_root"])
def cache_info(cache_ref: str, cache_root: str | None) -> None:
    """Print a cache's manifest (and its bases) as JSON."""
    click.echo(json.dumps(info(resolve_cache(cache_ref, cache_root)), indent=2, sort_keys=True))


@cache.command("verify")
@click.argument("cache_ref")
@click.option("--recompute", type=int, default=0, show_default=True, help="Rows to recompute with the teacher.")
@click_options(CacheConfig, only=["cache_root", "device"])
def cache_verify(cache_ref: str, recompute: int, cache_root: str | None, device: str) -> None:
    """Check completeness, shapes, NaN/Inf, labels, and recomputed rows; non-zero exit on a problem."""
    rep = verify_cache(resolve_cache(cache_ref, cache_root), recompute=recompute, device=device)
    for p in rep.problems:
        click.echo(f"problem: {p}")
    extra = f", {rep.recomputed_rows} recomputed (max rel. error {rep.max_rel_error:.2e})" if rep.recomputed_rows else ""
    if not rep.ok:
        raise VerifyFailed(f"{rep.path}: {len(rep.problems)} problem(s), first: {rep.problems[0]}")
    click.echo(f"ok: {rep.path} ({rep.checked_rows} rows checked{extra})")


# -- recipes -----------------------------------------------------------------

@main.command("run")
@click.argument("recipe", metavar="RECIPE.yaml")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe value by its dotted path, read as YAML (e.g. train.epochs=1); repeatable.")
@click.option("--dry-run", is_flag=True, help="Check the recipe and list its stages; run nothing.")
def run_cmd(recipe: str, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Run a recipe end to end: caches, bases, a grid of training runs, the teacher eval and the report.

    Resumable: built caches are hits, bases already fitted with the same options and finished runs are
    skipped, an interrupted run resumes. Prints the report (Markdown) and its files.
    """
    if dry_run:
        plan = load_recipe(recipe, overrides, check_paths=False)  # a preview: the placeholders may stay
        click.echo(f"caches: {', '.join(plan.caches)}; bases: {', '.join(plan.bases) or '-'}; "
                   f"teacher evals: {len(plan.evals)}; runs ({len(plan.runs)}) in {plan.out}:")
        for name in plan.runs:
            click.echo(f"  {name}")
        return
    res = run_recipe(recipe, overrides)
    done = sum(r["status"] == "done" for r in res["runs"].values())
    stopped = [r["run_dir"] for r in res["runs"].values() if r["status"] == "stopped"]
    log.info("%d run(s), %d finished before, %d stopped early", len(res["runs"]), done, len(stopped))
    for d in stopped:
        click.echo(f"stopped early: {d} (run the recipe again to resume it)", err=True)
    if res["report"]:
        click.echo(Path(res["report"]).read_text(), nl=False)
        click.echo(f"report: {res['report']}, chart: {res['png']}", err=True)


for _cmd in (basis, train, export, eval_cmd, report_cmd, bench_cmd):
    main.add_command(_cmd)
