"""A training run's directory: where it is, and its text files, each written whole.

``--out`` (default ``runs/<method>-<student>-<K>-s<seed>-<time>``) holds
``config.yaml`` (the resolved config, written at start), ``split.json`` (the
rows of each part), ``metrics.jsonl`` (one line per epoch), ``checkpoint.pt``
(tcskd.train.checkpoint), ``curves.png`` and ``final.json`` (at the end; it marks
the run finished, so it is written last).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tcskd import dist
from tcskd.errors import TcskdError
from tcskd.train.checkpoint import CHECKPOINT
from tcskd.train.config import TrainConfig

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
SPLIT = "split.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
FINAL = "final.json"


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in s)


def run_dir(cfg: TrainConfig, k: int | None) -> Path:
    """The run directory; refuses to overwrite a run unless resuming."""
    if cfg.out:
        out = Path(cfg.out)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{cfg.method}-{_slug(cfg.student)}-{k or 'na'}-s{cfg.seed}-{stamp}"
    if not cfg.resume:
        if (out / FINAL).exists():
            raise TcskdError(f"run directory {out} holds a finished run; pass --resume or another --out")
        if (out / CHECKPOINT).exists():
            raise TcskdError(f"run directory {out} holds an unfinished run; pass --resume to continue it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def shared_run_dir(cfg: TrainConfig, k: int | None) -> Path:
    """Rank 0 picks (and checks) the run directory; every rank gets the same one."""
    picked: tuple[str | None, str | None] = (None, None)
    if dist.is_main():
        try:
            picked = (str(run_dir(cfg, k)), None)
        except TcskdError as e:
            picked = (None, str(e))
    path, error = dist.broadcast_object(picked)
    if error:
        raise TcskdError(error)
    return Path(path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it: never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON with sorted keys, written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    """The metric rows of epochs 1..upto (rows of epochs lost to a crash are dropped)."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= upto]


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """One epoch's row at the end of ``metrics.jsonl``."""
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
