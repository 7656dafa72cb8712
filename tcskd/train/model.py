"""The student and its TCS head as one module: what a training step runs forward.

:func:`build_models` makes the student (``--student``, its map at ``--student-stage``) and the head the run
needs (tcskd.train.head: global projector, dense projector, classifier or pixel classifier), initialised from
the seed; :class:`StudentWithHead` runs them together (under torchrun wrapped by :func:`parallel_model`).

A head that reads both the pooled feature and the feature map (classification with a dense mimic, or
segmentation with a global one) gets the pooled feature as the global average pool of the map when the
student's ``forward`` is exactly that pool (checked once on a probe input, :func:`pools_its_map`): the
backbone then runs once per step, and its batch-norm statistics move once. Otherwise the student runs twice.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tcskd import dist
from tcskd.train.head import TCSHead
from tcskd.train.losses import align_to_grid
from tcskd.train.students import Student, make_student

log = logging.getLogger(__name__)


class StudentWithHead(torch.nn.Module):
    """Student and TCS head as one module, so that DistributedDataParallel syncs both."""

    def __init__(self, student: Student, head: TCSHead, pool_map: bool = False) -> None:
        super().__init__()
        self.student, self.head = student, head
        self.pool_map = pool_map

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, grid: tuple[int, int] | None = None,
                aug: torch.Tensor | None = None):
        """(f, logits, c_hat, d_hat, valid): the pooled feature (None when the head does not read it), logits
        (B x C, or B x C x H x W for segmentation), the global predicted coordinates, and the dense ones with
        the locations that count (None without a dense head). Given the teacher's ``grid`` (and the student's
        augmentation ``aug``), ``d_hat`` is B x K x Gh x Gw on that grid (tcskd.train.losses.align_to_grid),
        else B x K x h x w on the student's map with ``valid`` None.

        The map is aligned before the 1x1 projection: both are linear, and every valid location is a convex
        combination of map cells, so the result is the projection's alignment at a fraction of the cost
        (a K = 1280 raw-token projection at 32 x 32 px is 21x the work of one at 7 x 7)."""
        head = self.head
        fmap = self.student.feature_map(x) if head.needs_map else None
        f = None
        if head.needs_feature:
            f = F.adaptive_avg_pool2d(fmap, 1).flatten(1) if self.pool_map and fmap is not None else self.student(x)
        if head.task == "segment":
            logits, c_hat = head.segment(fmap, tuple(x.shape[-2:])), head.project(f)
        else:
            logits, c_hat = head(f, mask)
        if not head.dense:
            return f, logits, c_hat, None, None
        valid = None
        if grid is not None:
            fmap, valid = align_to_grid(fmap.float(), grid, aug, x.shape[-1])
        return f, logits, c_hat, head.project_map(fmap), valid


def build_models(cfg: Any, prep: Any) -> tuple[Student, TCSHead]:
    """The student and its TCS head, initialised from ``cfg.seed`` (torch, numpy and python seeded first)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2 ** 32))
    random.seed(cfg.seed)
    student = make_student(cfg.student, prep.num_classes, prep.channels, cfg.student_stage)
    if not (prep.dense or cfg.task == "segment"):
        return student, TCSHead(student.feature_dim, prep.num_classes, prep.k, cfg.classify_from)
    return student, TCSHead(student.feature_dim, prep.num_classes, prep.k, cfg.classify_from,
                            map_channels=student.map_channels, dense=prep.dense, global_=prep.global_,
                            task=cfg.task)


@torch.no_grad()
def pools_its_map(student: Student, size: int) -> bool:
    """Whether ``student(x)`` is the global average pool of ``student.feature_map(x)`` (on a seeded probe of
    ``size`` px, in eval mode; the global generators are not touched)."""
    modes = [(m, m.training) for m in student.modules()]
    p = next(student.parameters(), None)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, student.in_channels, size, size, generator=g).to(p.device if p is not None else "cpu")
    student.eval()
    try:
        f, fmap = student(x), student.feature_map(x)
        return f.shape[1] == fmap.shape[1] and torch.allclose(f, fmap.mean((2, 3)), rtol=1e-4, atol=1e-5)
    finally:
        for m, mode in modes:
            m.training = mode


def parallel_model(student: Student, head: TCSHead, device: torch.device, sync_bn: bool,
                   size: int) -> torch.nn.Module:
    """Student and head as one module; under torchrun, DistributedDataParallel (with SyncBatchNorm when asked)."""
    both = head.needs_map and head.needs_feature
    model: torch.nn.Module = StudentWithHead(student, head, pool_map=both and pools_its_map(student, size))
    if both:
        log.info("the head reads the pooled feature and the feature map: %s", "the map's pool" if model.pool_map
                 else "the student runs twice per step")
    if dist.world() > 1:
        # Every rank adds the same (all-reduced) importance on every step: no need for DDP to broadcast
        # rank 0's buffer at every forward.
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, ["head.importance"])
        if sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # A dense or segmentation head reads a feature map: the student's layers after it may go unused.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=head.needs_map)
    return model


def importance_rows(c_hat: torch.Tensor | None, c: torch.Tensor | None, dense: dict[str, Any]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, targets) as rows x K for the error criteria of tailoring: the global rows and the valid
    locations of the aligned dense predictions (``dense``: d_hat, d, valid as the loss takes them)."""
    preds, targets = ([c_hat.float()], [c.float()]) if c_hat is not None and c is not None else ([], [])
    if dense:
        d_al, d, valid = dense["d_hat"], dense["d"], dense["valid"]
        k = d_al.shape[1]
        rows, tgt = d_al.permute(0, 2, 3, 1).reshape(-1, k), d.reshape(-1, k)
        if valid is not None:
            keep = valid.reshape(-1) > 0
            rows, tgt = rows[keep], tgt[keep]
        preds.append(rows)
        targets.append(tgt)
    return torch.cat(preds), torch.cat(targets)
