"""click's own usage errors follow the house rule: one `tcskd: error:` line on stderr, exit 2; help, --version and
the bare `tcskd` are untouched."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import run_cli
from tcskd import __version__
from tcskd.cli import main

USAGE_ERRORS = [
    (["cache", "--split", "val"],
     "tcskd: error: Invalid value for '--split': 'val' is not one of 'train', 'test', 'all'."),
    (["cache", "--views", "two"], "tcskd: error: Invalid value for '--views': 'two' is not a valid integer."),
    (["cache", "--bogus"], "tcskd: error: No such option '--bogus'"),
    (["cache", "--data"], "tcskd: error: Option '--data' requires an argument."),
    (["cache", "info"], "tcskd: error: Missing argument 'CACHE_REF'."),
    (["cache", "verify", "x", "--recompute", "1.5"], "tcskd: error: Invalid value for '--recompute'"),
    (["--threads", "x", "cache"], "tcskd: error: Invalid value for '--threads': 'x' is not a valid integer."),
    (["--nope"], "tcskd: error: No such option '--nope'"),
    (["no-such-command"], "tcskd: error: No such command 'no-such-command'."),
    (["run"], "tcskd: error: Missing argument 'RECIPE.yaml'."),
    (["run", "r.yaml", "--set"], "tcskd: error: Option '--set' requires an argument."),
    (["basis", "--no-such-option"], "tcskd: error: No such option '--no-such-option'"),
    (["train", "--epochs", "many"], "tcskd: error: Invalid value for '--epochs'"),
    # build options given to the `cache` group before a subcommand would be ignored: refused instead
    (["cache", "--data", "x", "ls"],
     "tcskd: error: --data is an option of building a cache, not of 'tcskd cache ls': give ls's own options after it"),
    (["cache", "--cache-root", "r", "--views", "2", "info", "k"],
     "tcskd: error: --cache-root, --views are options of building a cache, not of 'tcskd cache info'"),
    (["cache", "--device", "cpu", "verify", "k"], "tcskd: error: --device is an option of building a cache"),
]


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args, prog_name="tcskd")


@pytest.mark.parametrize("args, starts", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_error_is_one_line(args, starts):
    r = _invoke(args)
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(starts), r.stderr
    assert r.stdout == ""


def test_usage_error_through_the_real_entry_point():
    r = run_cli(["cache", "--split", "val"], timeout=120)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "tcskd: error: Invalid value for '--split': 'val' is not one of 'train', 'test', 'all'."], r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["cache", "--help"], ["cache", "info", "-h"], ["basis", "-h"]])
def test_help_still_prints_usage(args):
    r = _invoke(args)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("Usage: tcskd"), r.stdout
    assert "tcskd: error" not in r.output


def test_version_still_works():
    r = _invoke(["--version"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"tcskd, version {__version__}"


def test_no_arguments_still_shows_help():
    r = _invoke([])
    assert "Usage: tcskd [OPTIONS] COMMAND [ARGS]..." in r.output
    assert "Commands:" in r.output and "tcskd: error" not in r.output
    assert r.exit_code in (0, 2)  # click < 8.2 exits 0, 8.2+ exits 2 (NoArgsIsHelpError)


def test_cache_subcommands_take_their_own_options(tmp_path):
    """Only build options given *before* a subcommand are refused; the subcommand's own options work, and
    `tcskd cache --data ...` alone still builds (its usage errors are covered above)."""
    r = _invoke(["cache", "ls", "--cache-root", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    r = _invoke(["cache", "info", "nope", "--cache-root", str(tmp_path)])
    assert r.exit_code != 0 and "nope" in r.stderr and len(r.stderr.splitlines()) == 1


def test_a_remote_client_error_mid_run_is_one_line():
    """An object store's client failing inside a stage (not through tcskd's own checks) is one line, exit 2;
    other exceptions still show their traceback (they are bugs)."""
    import botocore.exceptions
    import click
    from click.testing import CliRunner

    from tcskd.cli import _Group

    @click.group(cls=_Group)
    @click.option("--debug", is_flag=True)
    def root(debug):
        pass

    @root.command()
    def lost():
        raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket")

    @root.command()
    def bug():
        raise ZeroDivisionError("a bug")

    r = CliRunner().invoke(root, ["lost"])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcskd: error: remote storage: Could not connect"), r.output
    assert "127.0.0.1:9" in lines[0]
    r = CliRunner().invoke(root, ["bug"])
    assert isinstance(r.exception, ZeroDivisionError)
