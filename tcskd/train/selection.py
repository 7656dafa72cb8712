"""Tailoring: iterative selection of the active coordinates.

All K coordinates are active at the start. After every ``select_every``-th
epoch (never after the last one, so the final mask is the one the student
was trained with) the ``drop_frac`` of the active coordinates with the lowest
importance are dropped (at least one per step while ``drop_frac > 0``), but
never below ``min_dim``. Importance is accumulated between two selection
steps and then reset (:func:`step_importance`, the amount one optimizer step adds):

- ``grad``: ``|dL/dg|`` of the per-coordinate gate, summed over steps (the
  paper's accumulated gradient of a mask); it grows with a coordinate's error
  and with its predicted value, so it mostly keeps the leading coordinates;
- ``taylor``: the first-order change of the total loss when coordinate j is
  switched off, ``-dL/dm_j`` of the mask (``L(m_j = 0) - L(m) ~ -dL/dm_j``),
  summed over steps: a coordinate whose removal would raise the loss (CE too,
  when the classifier reads the coordinates) is important; one whose removal
  would lower it (a target the student cannot follow) is dropped first. With
  the classifier on the feature and no eLSH term the mask enters the loss
  only through the mimic term, linearly, and ``taylor`` drops the coordinates
  of largest absolute error first (mostly the leading, high-variance ones);
  CE (``classify_from='coords'``) or eLSH change that;
- ``error``: the per-coordinate relative squared error of a batch,
  ``sum_b (c_hat - c)^2 / sum_b c^2`` (1 - R^2 of the coordinate, so that the
  leading high-variance coordinates do not dominate by their scale alone); the
  coordinates the student already matches best are dropped;
- ``worst``: the same relative error with the opposite sign: the coordinates
  the student matches worst are dropped (the capacity-gap reading of tailoring).

Ties drop the later (lower-variance) coordinate first. ``select_every = 0``
switches tailoring off. Under torchrun every criterion is summed over the
ranks before a selection step (the loop does that), so all ranks keep the
same coordinates, chosen on all ranks' data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tcskd import dist

SELECT_BY = ("grad", "taylor", "error", "worst")


def step_importance(select_by: str, gate_grad: torch.Tensor | None, mask_grad: torch.Tensor | None,
                    c_hat: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """What one optimizer step adds to ``importance`` (K), for criterion ``select_by``."""
    if select_by == "grad":
        if gate_grad is None:
            raise ValueError("select_by grad needs the gate's gradient")
        return gate_grad.detach().abs()
    if select_by == "taylor":
        if mask_grad is None:
            raise ValueError("select_by taylor needs the mask's gradient")
        return -mask_grad.detach()
    # The error relative to the coordinate's own energy in the batch (1 - R^2 for centred targets):
    # in absolute terms the leading, high-variance coordinates always carry the largest errors.
    c = c.float()
    err = ((c_hat.detach().float() - c) ** 2).sum(0) / (c ** 2).sum(0).clamp_min(1e-12)
    if select_by == "error":
        return err
    if select_by == "worst":
        return -err
    raise ValueError(f"unknown select_by '{select_by}' (choose {', '.join(SELECT_BY)})")


@dataclass(frozen=True)
class SelectionSchedule:
    k: int
    epochs: int
    select_every: int = 0
    drop_frac: float = 0.1
    min_dim: int = 1

    def selects_after(self, epoch: int) -> bool:
        """True when a selection step follows epoch ``epoch`` (0-based)."""
        return (self.select_every > 0 and self.drop_frac > 0 and (epoch + 1) % self.select_every == 0
                and epoch + 1 < self.epochs)

    def keep(self, active: int) -> int:
        """How many coordinates stay active after one selection step from ``active``."""
        floor = min(max(1, self.min_dim), self.k)
        if active <= floor:
            return active
        drop = max(1, int(self.drop_frac * active))
        return max(floor, active - drop)

    def active_counts(self) -> list[int]:
        """Active coordinates during each epoch 0..epochs-1 (the pure schedule)."""
        out, active = [], self.k
        for e in range(self.epochs):
            out.append(active)
            if self.selects_after(e):
                active = self.keep(active)
        return out


def select(importance: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor, keep: int) -> np.ndarray:
    """The new 0/1 mask: the ``keep`` active coordinates with the highest importance."""
    imp = np.asarray(importance.detach().cpu() if isinstance(importance, torch.Tensor) else importance,
                     dtype=np.float64)
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.float64) > 0.5
    active = np.flatnonzero(m)
    if keep >= len(active):
        return m.astype(np.float32)
    # Sort the active coordinates by (importance descending, index ascending); keep the first `keep`.
    order = np.lexsort((active, -imp[active]))
    new = np.zeros_like(m, dtype=np.float32)
    new[active[order[:keep]]] = 1.0
    return new


def apply_selection(head: torch.nn.Module, schedule: SelectionSchedule, epoch: int) -> bool:
    """After epoch ``epoch``: shrink ``head.mask`` if the schedule says so; reset importance."""
    if not getattr(head, "k", None) or not schedule.selects_after(epoch):
        return False
    active = int(head.mask.sum().item())
    new = select(head.importance, head.mask, schedule.keep(active))
    head.mask.copy_(torch.from_numpy(new).to(head.mask))
    head.importance.zero_()
    return True


def gather_importance(head: torch.nn.Module, select_by: str, world: int, rank: int, everywhere: bool) -> None:
    """Under torchrun, after every epoch: rank 0's importance becomes the sum over all ranks and the
    others start again from 0, so rank 0's checkpoint holds what every rank accumulated (a run resumed
    with any number of processes goes on from the same total); before a selection step (``everywhere``)
    every rank keeps the sum, so all drop the same coordinates. ``grad`` needs nothing: DDP averages the
    gate's gradient, so every rank accumulates the same values."""
    if world == 1 or not head.k or select_by == "grad":
        return
    dist.all_reduce_sum(head.importance)
    if rank != 0 and not everywhere:
        head.importance.zero_()
