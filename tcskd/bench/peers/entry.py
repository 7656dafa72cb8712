"""What the two peer commands (``python -m tcskd.bench.peers`` and ``python -m tcskd.bench.peers.finetune``)
share: their logging, how they print an accuracy, and their exit on a TcskdError (one line, status 2)."""

from __future__ import annotations

import logging
import sys

import click

from tcskd.errors import TcskdError


def setup_logging(verbose: bool) -> None:
    """INFO (``-v``: every epoch) or WARNING on stderr."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def pct(v: float | None) -> str:
    """An accuracy in [0, 1] as a percentage (``n/a`` for None)."""
    return "n/a" if v is None else f"{100 * v:.2f}%"


def run_command(cmd: click.Command) -> None:
    """Run ``cmd`` on ``sys.argv``; a TcskdError exits 2 with one line on stderr."""
    try:
        cmd(standalone_mode=True)  # pylint: disable=no-value-for-parameter
    except TcskdError as e:
        print(f"tcskd: error: {e}", file=sys.stderr)
        sys.exit(2)
