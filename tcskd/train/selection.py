"""Tailoring: iterative selection of the active coordinates.

All K coordinates are active at the start. After every ``select_every``-th
epoch (never after the last one, so the final mask is the one the student
was trained with, and never while the importance window is empty, see below)
the ``drop_frac`` of the active coordinates with the lowest importance are
dropped (at least one per step while ``drop_frac > 0``), but never below
``min_dim``. Ties drop the later (lower-variance) coordinate first.
``select_every = 0`` switches tailoring off (and no importance is gathered).

Importance window. Importance is summed over optimizer steps and reset by
every selection step. Only the steps after the learning-rate warm-up count:
optimizer step s (0-based, over the run) adds to the importance iff
``s >= warmup_steps`` (``round(warmup_epochs * steps_per_epoch)``, the loop's
warm-up length). A selection step after epoch e (0-based) happens only when
at least one step of epochs 0..e counted, i.e. ``(e + 1) * steps_per_epoch >
warmup_steps``; a scheduled step that comes earlier waits: it is skipped, the
importance is not reset, and the next scheduled step selects on every counted
step since the start. (With the ``--tailor on`` schedule and one warm-up epoch
the first selection follows epoch 2, on epoch 2's importance.)

Criteria (``select_by``); what one optimizer step adds, on its global batch
with the weights before the step:

- ``ablation``: the exact increase of the total training loss when coordinate
  j alone is switched off, ``L(m - e_j) - L(m)`` (CE through the classifier when
  it reads the coordinates, the mimic term averaged over the active coordinates
  that remain, eLSH, the dense term), computed in closed form for every active
  j at once (:func:`ablation_deltas`). A coordinate whose removal would raise
  the loss is kept; one whose removal would lower it is dropped first. The
  mimic term is a mean over the active coordinates, so its part is
  ``lam (mean e - e_j) / (B (n - 1))``: any coordinate with an above-average
  absolute error (a target the student cannot follow, but also, early in
  training, the leading high-variance coordinates) lowers the loss when
  removed; with lam = 10 and 256 coordinates that part outweighs CE's (a 3-epoch
  run on the built-in default dropped PCA ranks 0-50 first);
- ``ablation-ce``: the same, CE alone: the exact increase of the task loss
  when coordinate j is switched off, which only the classifier reading the
  coordinates (``classify_from='coords'``) sees. With the classifier on the
  feature it is 0 for every coordinate, and the ties keep the leading ones
  (the fixed first K);
- ``taylor``: Molchanov et al.'s first-order importance, the magnitude of the
  loss gradient of the mask on each batch, ``|dL/dm_j|``, summed over the
  batches. It measures how much the loss *moves* with a coordinate, in either
  direction: a target the student cannot follow moves the mimic term a lot
  and is kept (see tests/test_tailoring_toy.py);
- ``error``: the per-coordinate relative squared error of a batch,
  ``sum_b (c_hat - c)^2 / sum_b c^2`` (1 - R^2 of the coordinate, so that the
  leading high-variance coordinates do not dominate by their scale alone); the
  coordinates the student already matches best are dropped;
- ``worst``: the same relative error with the opposite sign: the coordinates
  the student matches worst are dropped (the capacity-gap reading of tailoring).

``grad`` (|dL/dg| of a per-coordinate gate) was removed: the gate only rescales
the projector's output row, so at g = 1 its gradient is ``<w_j, dL/dw_j> +
b_j dL/db_j``, which training drives towards ``-wd * ||(w_j, b_j)||^2``; what
accumulated was mostly minibatch noise. ``ablation`` replaces it.

Under torchrun every rank computes its share of a step's statistics
(:func:`step_stats`: gradients and loss changes divided by the world size,
squared errors and energies as sums), the loop sums them over the ranks and
:func:`combine` turns the sum into the step's importance, so every rank holds
the importance one process would on the same global batches (error, worst: one
ratio over all ranks' rows; taylor: the magnitude of the global batch's
gradient) and all ranks drop the same coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tcskd.train.losses import ce_loss, elementwise_distance

SELECT_BY = ("ablation", "ablation-ce", "taylor", "error", "worst")
#: The criteria measured by switching coordinates off (:func:`ablation_deltas`).
ABLATIONS = ("ablation", "ablation-ce")
#: Criteria that were removed, with the one line that says what replaces them.
REMOVED = {"grad": "--select-by grad was removed (|dL/dgate| measured mostly minibatch noise): use ablation, "
                   "the exact loss increase of switching a coordinate off"}
#: Elements of one chunk of the batched ablation (rows x coordinates x classes or bits).
ABLATION_CHUNK = 1 << 22


def step_stats(select_by: str, world: int = 1, *, mask_grad: torch.Tensor | None = None,
               deltas: torch.Tensor | None = None, pred: torch.Tensor | None = None,
               target: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's share of one step's statistics for criterion ``select_by``: summed over the ``world`` ranks
    and passed to :func:`combine`, it gives the step's importance on the global batch. taylor: the mask's
    gradient / world (K); ablation: the loss changes of :func:`ablation_deltas` / world (K); error, worst: the
    squared errors and the energies of the rows, ``sum_b (c_hat - c)^2`` then ``sum_b c^2`` (2K)."""
    if select_by == "taylor":
        if mask_grad is None:
            raise ValueError("select_by taylor needs the mask's gradient")
        return mask_grad.detach().float() / world
    if select_by in ABLATIONS:
        if deltas is None:
            raise ValueError("select_by ablation needs the loss changes of masking each coordinate")
        return deltas.detach().float() / world
    if select_by in ("error", "worst"):
        if pred is None or target is None:
            raise ValueError(f"select_by {select_by} needs the predicted and target coordinates")
        c = target.detach().float()
        return torch.cat([((pred.detach().float() - c) ** 2).sum(0), (c ** 2).sum(0)])
    raise ValueError(f"unknown select_by '{select_by}' (choose {', '.join(SELECT_BY)})")


def combine(select_by: str, stats: torch.Tensor) -> torch.Tensor:
    """One step's importance (K) from the statistics of :func:`step_stats` summed over the ranks: taylor
    ``|dL/dm|``; ablation the loss change itself; error ``num / den`` per coordinate, one ratio over all
    the ranks' rows (1 - R^2, so that the leading high-variance coordinates do not dominate by their scale);
    worst its negative."""
    if select_by == "taylor":
        return stats.abs()
    if select_by in ABLATIONS:
        return stats
    if select_by in ("error", "worst"):
        num, den = stats.chunk(2)
        err = num / den.clamp_min(1e-12)
        return err if select_by == "error" else -err
    raise ValueError(f"unknown select_by '{select_by}' (choose {', '.join(SELECT_BY)})")


def step_importance(select_by: str, *, mask_grad: torch.Tensor | None = None, deltas: torch.Tensor | None = None,
                    pred: torch.Tensor | None = None, target: torch.Tensor | None = None) -> torch.Tensor:
    """What one optimizer step of one process adds to ``importance`` (K): :func:`combine` of :func:`step_stats`."""
    return combine(select_by, step_stats(select_by, 1, mask_grad=mask_grad, deltas=deltas, pred=pred,
                                         target=target))


# -- ablation: the exact loss change of switching each coordinate off ------------------------------------

def _chunks(k: int, width: int) -> list[slice]:
    """Coordinate slices whose rows x coordinates x ``width`` tensors stay under ABLATION_CHUNK elements."""
    step = max(1, ABLATION_CHUNK // max(1, width))
    return [slice(i, min(k, i + step)) for i in range(0, k, step)]


def _mimic_ablated(pred: torch.Tensor, tgt: torch.Tensor, m: torch.Tensor, kind: str,
                   weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mimic_loss with mask m, the same with each coordinate j switched off: K) of rows x K predictions, in
    closed form (tcskd.train.losses.mimic_loss's definition)."""
    if kind == "cosine":
        eps = 1e-8
        a, b = pred * m, tgt * m
        dot, aa, bb = (a * b).sum(1), (a * a).sum(1), (b * b).sum(1)
        base = 1.0 - dot / (aa.sqrt().clamp_min(eps) * bb.sqrt().clamp_min(eps))
        abl = 1.0 - (dot[:, None] - a * b) / ((aa[:, None] - a * a).clamp_min(0).sqrt().clamp_min(eps)
                                             * (bb[:, None] - b * b).clamp_min(0).sqrt().clamp_min(eps))
        if weight is None:
            return base.mean(), abl.mean(0)
        wsum = weight.sum().clamp(min=1)
        return (base * weight).sum() / wsum, (abl * weight[:, None]).sum(0) / wsum
    per = elementwise_distance(kind, pred, tgt)
    if weight is None:
        col, rows = per.sum(0), torch.tensor(float(pred.shape[0]), device=pred.device)
    else:
        col, rows = (per * weight[:, None]).sum(0), weight.sum().clamp(min=1)
    n = m.sum()
    s = (col * m).sum()
    return s / (rows * n.clamp(min=1)), (s - col * m) / (rows * (n - m).clamp(min=1))


def _ce_ablated(logits: torch.Tensor, labels: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean CE over the labelled rows when coordinate j of the classifier's input ``a`` (B x K, the masked
    coordinates) is zeroed, for every j (K): the logits lose ``a_j * w[:, j]``."""
    keep = labels >= 0
    k = a.shape[1]
    if not bool(keep.any()):
        return a.new_zeros(k)
    lg, y, a = logits[keep], labels[keep], a[keep]
    out = []
    for part in _chunks(k, lg.shape[0] * lg.shape[1]):
        lj = lg[:, None, :] - a[:, part, None] * w.T[None, part, :]           # B x J x C
        pick = lj.gather(2, y.view(-1, 1, 1).expand(-1, lj.shape[1], 1)).squeeze(2)
        out.append((torch.logsumexp(lj, dim=2) - pick).mean(0))
    return torch.cat(out)


def _elsh_ablated(c_hat: torch.Tensor, c: torch.Tensor, m: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(elsh_loss with mask m, the same with each coordinate j switched off: K): the student's and the
    teacher's hash pre-activations both lose coordinate j's term."""
    a, t = c_hat * m, c * m
    w = w.to(a)
    pre, tpre = a @ w.T + b.to(a), t @ w.T + b.to(a)
    base = F.binary_cross_entropy_with_logits(pre, (tpre > 0).to(pre.dtype))
    out = []
    for part in _chunks(a.shape[1], a.shape[0] * w.shape[0]):
        pj = pre[:, None, :] - a[:, part, None] * w.T[None, part, :]          # B x J x bits
        tj = tpre[:, None, :] - t[:, part, None] * w.T[None, part, :]
        out.append(F.binary_cross_entropy_with_logits(pj, (tj > 0).to(pj.dtype), reduction="none").mean((0, 2)))
    return base, torch.cat(out)


@torch.no_grad()
def ablation_deltas(logits: torch.Tensor, labels: torch.Tensor, c_hat: torch.Tensor | None,
                    c: torch.Tensor | None, mask: torch.Tensor, lam: float, mimic: str = "mse",
                    elsh: tuple[torch.Tensor, torch.Tensor] | None = None, elsh_weight: float = 0.0,
                    classifier_weight: torch.Tensor | None = None, d_hat: torch.Tensor | None = None,
                    d: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``L(m - e_j) - L(m)`` for every coordinate j (K; 0 for the inactive ones), ``L`` the total loss of
    tcskd.train.losses.tcs_loss with the same arguments. ``classifier_weight`` (C x K): the classifier reads
    the masked coordinates (``classify_from='coords'``), so CE changes too; None: it reads the feature and CE
    does not depend on the mask. Exact (no first-order approximation), all coordinates at once."""
    m = mask.detach().float()
    delta = torch.zeros_like(m)
    if classifier_weight is not None and c_hat is not None:
        lg = logits.detach().float()
        delta += _ce_ablated(lg, labels, c_hat.detach().float() * m, classifier_weight.detach().float()) \
            - ce_loss(lg, labels)
    if c_hat is not None and c is not None:
        ch, ct = c_hat.detach().float(), c.detach().float()
        base, abl = _mimic_ablated(ch, ct, m, mimic)
        delta += lam * (abl - base)
        if elsh is not None and elsh_weight:
            base, abl = _elsh_ablated(ch, ct, m, *elsh)
            delta += elsh_weight * (abl - base)
    if d_hat is not None and d is not None:
        k = d_hat.shape[1]
        rows = d_hat.detach().float().permute(0, 2, 3, 1).reshape(-1, k)
        weight = None if valid is None else valid.detach().reshape(-1).float()
        base, abl = _mimic_ablated(rows, d.detach().float().reshape(-1, k), m, mimic, weight)
        delta += lam * (abl - base)
    return delta * m


# -- the schedule and the selection step ------------------------------------------------------------------

@dataclass(frozen=True)
class SelectionSchedule:
    """When tailoring selects and how many coordinates it keeps (see the module's docstring)."""

    k: int
    epochs: int
    select_every: int = 0
    drop_frac: float = 0.1
    min_dim: int = 1
    warmup_steps: int = 0
    """Optimizer steps of the learning-rate warm-up: they add nothing to the importance."""
    steps_per_epoch: int = 1

    @property
    def on(self) -> bool:
        """Whether the schedule ever selects (then the loop gathers importance)."""
        return self.select_every > 0 and self.drop_frac > 0

    def gathers(self, step: int) -> bool:
        """True when optimizer step ``step`` (0-based over the run) adds to the importance."""
        return self.on and step >= self.warmup_steps

    def selects_after(self, epoch: int) -> bool:
        """True when a selection step follows epoch ``epoch`` (0-based): a scheduled one that is not after
        the last epoch and whose window holds at least one step after the warm-up."""
        return (self.on and (epoch + 1) % self.select_every == 0 and epoch + 1 < self.epochs
                and (epoch + 1) * self.steps_per_epoch > self.warmup_steps)

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


def warmup_steps_of(warmup_epochs: float, steps_per_epoch: int) -> int:
    """The loop's warm-up length in optimizer steps, ``round(warmup_epochs * steps_per_epoch)``."""
    return int(round(warmup_epochs * steps_per_epoch)) if math.isfinite(warmup_epochs) else 0


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


def kept_ranks(mask: torch.Tensor) -> list[int]:
    """The active coordinates of ``mask`` as indices into the basis's components (0 = the leading one)."""
    return [int(i) for i in torch.nonzero(mask.detach().cpu() > 0.5).flatten().tolist()]
