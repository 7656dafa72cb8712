"""The TCS head: classifier + projector onto the teacher's coordinates, mask and gate.

``f`` (B x d_s) -> ``c_hat = g * projector(f)`` (B x K predicted coordinates)
and logits for CE, read either from the feature (``classify_from='feature'``:
``classifier(f)``) or from the active predicted coordinates
(``classify_from='coords'``: ``classifier(m * c_hat)``, the student's feature
expressed in the teacher's coordinate system), where

- ``mask`` (buffer, K, float 0/1) marks the active coordinates; the loss only
  sees ``mask * c_hat`` (tcskd.train.losses);
- ``gate`` (parameter, K, all ones, no gradient, never updated by the optimizer)
  is a fixed per-coordinate scale kept in the state dict (checkpoints and
  exports carry it); tailoring's importance comes from the mask
  (tcskd.train.selection);
- ``importance`` (buffer, K) accumulates the tailoring criterion between two
  selection steps (tcskd.train.selection).

Dense (``dense=True``, ``map_channels`` = the student's ``feature_map`` channels): ``dense_projector``, a 1x1
convolution, maps the feature map (B x C_map x h x w) to K predicted coordinates per location,
``d_hat = g * dense_projector(map)``, gated and masked with the SAME gate, mask and importance as the global
projector: one set of K coordinates, so with both projectors the two mimic terms share the mask. Without
``global_`` there is no global projector (``--mimic-on dense``).

Segmentation (``task='segment'``): the classifier is ``pixel_classifier``, a 1x1 convolution from the feature
map to the classes, upsampled bilinearly to the input size (:meth:`segment`): B x C x H x W logits.

Everything the tailoring needs lives in this module's state dict, so a
checkpoint carries it. With ``k = None`` (method ``ce``) the head is only the
classifier. At inference the head is one linear map of ``f``: ``classifier``
itself, or, reading coordinates, ``classifier`` merged with the gated, masked
projector (:meth:`inference_classifier`), so the exported student costs
nothing extra either way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CLASSIFY_FROM = ("feature", "coords")


class TCSHead(nn.Module):
    def __init__(self, feature_dim: int, num_classes: int, k: int | None, classify_from: str = "feature",
                 map_channels: int | None = None, dense: bool = False, global_: bool = True,
                 task: str = "classify") -> None:
        super().__init__()
        if classify_from not in CLASSIFY_FROM:
            raise ValueError(f"unknown classify_from '{classify_from}' (choose {', '.join(CLASSIFY_FROM)})")
        if (dense or task == "segment") and not map_channels:
            raise ValueError("a dense or segmentation head needs the student's map_channels")
        self.k, self.task = k, task
        self.global_ = bool(k) and global_
        self.classify_from = classify_from if self.global_ and task == "classify" else "feature"
        self.pixel_classifier: nn.Conv2d | None = None
        if task == "segment":
            self.pixel_classifier = nn.Conv2d(int(map_channels), max(1, num_classes), 1)
        else:
            self.classifier = nn.Linear(k if self.classify_from == "coords" else feature_dim, max(1, num_classes))
        self.projector: nn.Linear | None = nn.Linear(feature_dim, k) if self.global_ else None
        self.dense_projector: nn.Conv2d | None = nn.Conv2d(int(map_channels), k, 1) if k and dense else None
        if k:
            self.gate = nn.Parameter(torch.ones(k), requires_grad=False)
            self.register_buffer("mask", torch.ones(k))
            self.register_buffer("importance", torch.zeros(k))

    @property
    def dense(self) -> bool:
        """Whether the head predicts coordinates per location (it reads the student's feature map)."""
        return self.dense_projector is not None

    @property
    def needs_feature(self) -> bool:
        """Whether the head reads the pooled student feature (classifier or global projector)."""
        return self.task == "classify" or self.projector is not None

    @property
    def needs_map(self) -> bool:
        """Whether the head reads the student's feature map (dense projector or pixel classifier)."""
        return self.dense or self.task == "segment"

    def project(self, f: torch.Tensor | None) -> torch.Tensor | None:
        """``g * projector(f)``: B x K predicted coordinates (None without a global projector)."""
        if self.projector is None or f is None:
            return None
        return self.gate * self.projector(f)

    def project_map(self, fmap: torch.Tensor) -> torch.Tensor | None:
        """``g * dense_projector(fmap)``: B x K x h x w predicted coordinates (None without a dense head)."""
        if self.dense_projector is None:
            return None
        return self.gate.view(1, -1, 1, 1) * self.dense_projector(fmap)

    def segment(self, fmap: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Pixel logits B x C x H x W: ``pixel_classifier(fmap)`` upsampled bilinearly to ``size``."""
        logits = self.pixel_classifier(fmap)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits

    def forward(self, f: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, c_hat) of a classification head; ``mask`` replaces ``self.mask`` (the loop passes a copy to
        differentiate). c_hat is None without a global projector."""
        if self.projector is None:
            return self.classifier(f), None
        c_hat = self.gate * self.projector(f)
        if self.classify_from == "coords":
            m = self.mask if mask is None else mask
            return self.classifier(c_hat * m.to(c_hat.dtype)), c_hat
        return self.classifier(f), c_hat

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the optimizer updates (not the gate: a fixed scale of ones)."""
        params = list((self.pixel_classifier if self.task == "segment" else self.classifier).parameters())
        for module in (self.projector, self.dense_projector):
            if module is not None:
                params += list(module.parameters())
        return params

    @torch.no_grad()
    def inference_classifier(self) -> nn.Linear:
        """The head at inference as one linear layer on ``f`` (logits only)."""
        if self.classify_from == "feature":
            return self.classifier
        scale = (self.gate * self.mask).unsqueeze(1)                   # K x 1
        w = self.classifier.weight @ (scale * self.projector.weight)  # C x d_s
        b = self.classifier.weight @ (scale.squeeze(1) * self.projector.bias) + self.classifier.bias
        out = nn.Linear(w.shape[1], w.shape[0])
        out.weight.copy_(w)
        out.bias.copy_(b)
        return out

    @property
    def active(self) -> int:
        return int(self.mask.sum().item()) if self.k else 0
