"""Stage 3: train students from cached teacher coordinates (no teacher in the loop).

- ``loop``: ``train(cfg) -> final.json dict``, one page: prepare, build, restore, then per epoch train,
  evaluate, select, save; the final scores.
- ``inputs``: what a run reads before it starts (``RunInputs``): rows, targets and datasets.
- ``targets``: which rows of the dataset the cache holds, and their targets (bases, scale).
- ``data``: the datasets, the epoch sampler, augmentation and the DataLoaders (``train_loader``).
- ``students``: the student networks (``--student``), each a backbone to a penultimate feature.
- ``head``: the TCS head (classifier, projector, coordinate mask, fixed gate and tailoring importance).
- ``losses``: CE + lambda * mimic + mu * eLSH, as pure functions.
- ``selection``: tailoring (iterative coordinate selection) schedule.
- ``config``: ``TrainConfig`` / ``EvalConfig`` (every option declared once; ``validate``, the tailor presets).
- ``checkpoint``: the checkpoint's content, its atomic write, RNG state, resume checks.
- ``rundir``: the run directory and its files (atomic text writes, ``metrics.jsonl``).
- ``plots``: the learning curves (``curves.png``).
- ``evaluate``: kNN and linear-probe accuracy of features; a student's final scores.
- ``export``: a run's student as a ``torch.export`` program (``.pt2``) or ONNX model returning logits.
- ``logger``: ``--log``: metrics.jsonl mirrored to TensorBoard and/or wandb (``MetricsLogger``).
- ``report``: tables and plots over many runs.
- ``commands``: the click commands ``train``, ``eval``, ``export`` and ``report``.

This package never imports ``tcskd.teachers`` unless the method is ``online``.

The package itself is callable as the stage: ``tcskd.train(cfg)`` is ``tcskd.train.loop.train(cfg)`` (the Python
API's ``train``; the name is both, since ``import tcskd.train.loop`` makes ``tcskd.train`` this package). Importing
it stays cheap: the loop (and torch) load on the first call.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tcskd.results import StoppedRun, TrainResult
    from tcskd.train.config import TrainConfig


class _StagePackage(types.ModuleType):
    """``tcskd.train``: the package, and a callable that runs stage 3."""

    def __call__(self, cfg: TrainConfig) -> TrainResult | StoppedRun:
        """Stage 3: train ``cfg.student`` on ``cfg.cache`` (tcskd.train.loop.train); the content of
        ``final.json`` (tcskd.results.TrainResult), or a StoppedRun after ``cfg.stop_after`` epochs.
        With ``resume=True`` the fields left at their defaults come from the run's config.yaml, as
        ``tcskd train --resume --out RUN_DIR`` takes the options not given on its command line."""
        cfg = importlib.import_module("tcskd.train.config").with_saved_config(cfg)
        return importlib.import_module("tcskd.train.loop").train(cfg)


sys.modules[__name__].__class__ = _StagePackage
