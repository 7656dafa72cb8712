"""Learning-rate schedules as pure functions of the optimizer step (the loop sets each step's rate)."""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, schedule: str = "cosine",
          milestones: tuple[int, ...] = (), gamma: float = 0.1) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to 0, steps (x0.1 at
    50% and 75% of ``total_steps``) or multistep (x ``gamma`` for each of ``milestones``, given in steps,
    that ``step`` has reached)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        passed = sum(step >= int(f * total_steps) for f in (0.5, 0.75))
        return base_lr * 0.1 ** passed
    if schedule == "multistep":
        return base_lr * gamma ** sum(step >= m for m in milestones)
    raise ValueError(f"unknown schedule '{schedule}'")
