"""Mirror a run's ``metrics.jsonl`` to experiment trackers: ``tcskd train --log tensorboard,wandb``.

``metrics.jsonl`` stays the record; a :class:`MetricsLogger` only copies it. The loop opens one with
:func:`open_logger` (rank 0), hands it each epoch's row as it appends it (``log_epoch``: every number
of the row, tagged ``epoch/<key>``, at step = the epoch) and the final scores at the end
(``log_final``: the numbers of ``final.json``, tagged ``final/<key>``, at step = the last epoch).
Backends, each an optional package (an extra of tcskd):

- ``tensorboard``: event files in ``RUN_DIR/tb/`` (torch.utils.tensorboard). A resumed run purges the
  events of the epochs it redoes (``purge_step``), so every epoch has one value, as in metrics.jsonl.
- ``wandb``: an offline run in ``RUN_DIR/wandb/`` (``WANDB_MODE`` may say otherwise); sync it with
  ``wandb sync``. Its id is stored in ``RUN_DIR/wandb-id`` so that a resumed run goes on in it.

:func:`check_backends` refuses, in one line naming the extra, a backend whose package is missing; the
config's ``validate()`` calls it, so the check comes before any training.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

from tcskd.errors import TcskdError

log = logging.getLogger(__name__)

#: backend -> (the package it imports, the tcskd extra that installs it).
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
#: ``--log`` without a backend.
NONE = "none"
TB_DIR = "tb"
WANDB_DIR = "wandb"
WANDB_ID = "wandb-id"


class MetricsLogger(Protocol):
    """Where the loop's metric rows are mirrored (rank 0 only)."""

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One row of ``metrics.jsonl`` (it carries its ``epoch``)."""

    def log_final(self, final: dict[str, Any], epoch: int) -> None:
        """The content of ``final.json``, after ``epoch`` (the last)."""

    def close(self) -> None:
        """Flush and release the backend."""


def parse_backends(spec: str | None) -> tuple[str, ...]:
    """The backends of ``--log``: ``none`` (or empty) -> (), ``tensorboard,wandb`` -> both; TcskdError for
    an unknown name."""
    names = [s.strip() for s in (spec or NONE).split(",") if s.strip()]
    for name in names:
        if name != NONE and name not in BACKENDS:
            raise TcskdError(f"unknown --log backend '{name}' (choose {NONE}, {', '.join(BACKENDS)} or a comma list)")
    return tuple(dict.fromkeys(n for n in names if n != NONE))


def check_backends(spec: str | None) -> None:
    """TcskdError (one line naming the extra) when the package of a backend of ``spec`` is not installed."""
    for name in parse_backends(spec):
        package, extra = BACKENDS[name]
        if importlib.util.find_spec(package) is None:
            raise TcskdError(f"--log {name} needs the {package} package: pip install 'tcskd[{extra}]'")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``row`` (bools, strings, None and NaN left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class NullLogger:
    """``--log none``: nothing is mirrored."""

    def log_epoch(self, row: dict[str, Any]) -> None:
        pass

    def log_final(self, final: dict[str, Any], epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Scalars in TensorBoard event files under ``log_dir``; events at steps >= ``purge_step`` written by an
    earlier process (the epochs a resumed run redoes) are hidden."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log_epoch(self, row: dict[str, Any]) -> None:
        step = int(row["epoch"])
        for key, value in scalars(row).items():
            if key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, step)
        self.writer.flush()

    def log_final(self, final: dict[str, Any], epoch: int) -> None:
        for key, value in scalars(final).items():
            self.writer.add_scalar(f"final/{key}", value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """An offline Weights & Biases run in ``run_dir/wandb``, resumed by the id kept in ``run_dir/wandb-id``."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        id_file = run_dir / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        (run_dir / WANDB_DIR).mkdir(exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tcskd"), name=run_dir.name, id=run_id,
                              dir=str(run_dir / WANDB_DIR), mode=os.environ.get("WANDB_MODE", "offline"),
                              config=config, resume="allow")

    def log_epoch(self, row: dict[str, Any]) -> None:
        step = int(row["epoch"])
        self.run.log({f"epoch/{k}": v for k, v in scalars(row).items() if k != "epoch"}, step=step)

    def log_final(self, final: dict[str, Any], epoch: int) -> None:
        for key, value in scalars(final).items():
            self.run.summary[f"final/{key}"] = value

    def close(self) -> None:
        self.run.finish()


class MultiLogger:
    """Several backends as one."""

    def __init__(self, loggers: list[MetricsLogger]) -> None:
        self.loggers = loggers

    def log_epoch(self, row: dict[str, Any]) -> None:
        for lg in self.loggers:
            lg.log_epoch(row)

    def log_final(self, final: dict[str, Any], epoch: int) -> None:
        for lg in self.loggers:
            lg.log_final(final, epoch)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def open_logger(spec: str | None, run_dir: Path, start_epoch: int = 0,
                config: dict[str, Any] | None = None) -> MetricsLogger:
    """The logger of ``--log spec`` writing into ``run_dir``; ``start_epoch`` is the last epoch already in
    ``metrics.jsonl`` (a resumed run): what a backend holds beyond it is replaced."""
    check_backends(spec)
    loggers: list[MetricsLogger] = []
    for name in parse_backends(spec):
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir / TB_DIR, purge_step=start_epoch + 1))
        else:
            loggers.append(WandbLogger(run_dir, config or {}))
        log.info("mirroring metrics.jsonl to %s", name)
    if not loggers:
        return NullLogger()
    return loggers[0] if len(loggers) == 1 else MultiLogger(loggers)


__all__ = ["BACKENDS", "MetricsLogger", "parse_backends", "check_backends", "scalars", "NullLogger",
           "TensorBoardLogger", "WandbLogger", "MultiLogger", "open_logger"]
