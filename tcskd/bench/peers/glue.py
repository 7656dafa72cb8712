"""What tcskd supplies to a peer arm, and nothing more: the teacher as a module, the student and head as
``tcskd train`` initialises them, the labelled-rows cross-entropy, the per-step learning rate and the target
scale of ``--method fitnet``.

- :class:`PeerTeacher`: the cache's teacher (``tcskd.teachers.load_teacher`` of the cache's spec and size,
  eval mode, frozen) as an ``nn.Module`` that takes the student's input (B x C x S x S in [0, 1]), takes its
  centre view at the teacher's size exactly as the cache stage does (:func:`tcskd.views.center_view`),
  normalises it with the teacher's mean and std and returns the teacher's global embedding divided by the
  target scale. The division is a submodule (``embedding``, :class:`TargetScale`) so that torchdistill can
  hook it; ``forward_features`` / ``forward_head`` / ``num_features`` / ``pretrained_cfg`` are what timm's
  ``DistillationTeacher`` reads (timm normalises the input itself: ``normalize=False`` there).
- :class:`PeerStudent`: tcskd's student (``tcskd.train.students``) and the classifier of its head, as one
  module returning logits (torchdistill hooks ``backbone``), with timm's model interface
  (``forward_features``: the pooled feature, ``forward_head``; inputs in [0, 1], so mean 0 and std 1).
- :class:`LabelledCrossEntropy`: the mean cross-entropy over the rows with a label (label >= 0), 0 for a batch
  without one: ``tcskd.train.losses.ce_loss``. ``nn.CrossEntropyLoss(ignore_index=-1)`` returns NaN on such a
  batch (0 / 0), and timm's and torchdistill's default CE (ignore_index -100) fails on the label -1.
- :func:`step_lr_lambda`: ``tcskd.train.schedule.lr_at`` as a ``LambdaLR`` factor, stepped after every
  optimizer step (``lr_at(step)`` at step ``step``, warm-up included).
- :func:`fitnet_target_scale`: the divisor ``tcskd train --method fitnet`` applies to the cached features
  (``--target-norm global``: the root mean square of the training rows' features, or of the identity basis's
  second moments; 1 with ``none``), read from the cache chunk by chunk.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from tcskd.train.losses import ce_loss
from tcskd.train.schedule import lr_at
from tcskd.views import center_view

log = logging.getLogger(__name__)


class TargetScale(nn.Module):
    """``x / scale`` (a fixed float): the teacher's embedding as tcskd's fitnet targets are scaled."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}"


class PeerTeacher(nn.Module):
    """The cache's teacher on the student's input (module docstring); ``forward(x)`` -> B x D float32."""

    def __init__(self, teacher: Any, scale: float = 1.0, normalize: bool = True) -> None:
        super().__init__()
        self.backbone = teacher.module
        self._embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] = teacher.embed
        self.image_size = int(teacher.image_size)
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(teacher.mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(teacher.std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.embedding = TargetScale(scale)
        self.num_features = int(teacher.dim)
        self.pretrained_cfg = {"mean": tuple(teacher.mean), "std": tuple(teacher.std)}
        self.spec = teacher.spec
        self.eval()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's global embedding (B x D) of the centre view of ``x`` at its size."""
        x = center_view(x.float(), self.image_size)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.normalize:
            x = (x - self.mean) / self.std
        return self._embed(self.backbone, x.contiguous(memory_format=torch.channels_last)).float()

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The embedding divided by the target scale (there is no classifier: ``pre_logits`` changes nothing)."""
        return self.embedding(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class PeerStudent(nn.Module):
    """tcskd's student and its head's classifier as one classification model (module docstring)."""

    def __init__(self, student: nn.Module, classifier: nn.Linear) -> None:
        super().__init__()
        self.backbone = student
        self.classifier = classifier
        self.num_features = int(student.feature_dim)
        self.head_hidden_size = int(student.feature_dim)
        self.num_classes = int(classifier.out_features)
        self.in_chans = int(student.in_channels)
        self.pretrained_cfg = {"mean": (0.0,) * self.in_chans, "std": (1.0,) * self.in_chans}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return f if pre_logits else self.classifier(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


class LabelledCrossEntropy(nn.Module):
    """Mean cross-entropy over the rows with ``target >= 0``; 0 (with a gradient path) when there are none."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ce_loss(logits.float(), target)


def step_lr_lambda(total_steps: int, warmup_steps: int, base_lr: float, schedule: str,
                   milestones: tuple[int, ...], gamma: float) -> Callable[[int], float]:
    """The factor of ``torch.optim.lr_scheduler.LambdaLR`` that gives ``lr_at(step)`` at optimizer step
    ``step`` (the scheduler stepped once after every optimizer step)."""
    def factor(step: int) -> float:
        return lr_at(step, total_steps, warmup_steps, base_lr, schedule, milestones, gamma) / base_lr

    return factor


def fitnet_target_scale(cache: str, cache_root: str | None, store_rows: np.ndarray, norm: str,
                        basis_name: str = "pca") -> float:
    """The divisor of ``tcskd train --method fitnet``'s targets for the training rows ``store_rows`` of
    ``cache`` (as ``tcskd.train.inputs.load_fit_targets`` computes it; raw features are read chunk by chunk)."""
    from tcskd.store.handle import open_cache
    from tcskd.train.targets import RAW, StoreTargets, resolve_basis, target_scale

    if norm == "none":
        return 1.0
    handle = open_cache(cache, cache_root)
    store = handle.store
    try:
        basis = resolve_basis(store, "fitnet", basis_name, None, None, handle.manifest.coords_of)
        if basis.name != RAW:
            return target_scale(basis, None, norm)
        mean_sq = StoreTargets(store, np.asarray(store_rows, np.int64), basis, "global").mean_square()
        return target_scale(basis, None, norm, mean_sq)
    finally:
        store.close()


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (a teacher must leave training as it came)."""
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def peer_versions() -> dict[str, str | None]:
    """The versions of the peer frameworks installed (None: not installed) and of torch."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torchdistill", "timm", "torch", "torchvision"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out

