"""``python -m tcskd.bench``: the ``bench`` command on its own."""

from __future__ import annotations

import logging
import sys

from tcskd.bench.cli import bench_cmd
from tcskd.errors import TcskdError

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        bench_cmd()  # pylint: disable=no-value-for-parameter
    except TcskdError as e:
        print(f"tcskd: error: {e}", file=sys.stderr)
        sys.exit(2)
