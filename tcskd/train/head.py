"""The TCS head: classifier + projector onto the teacher's coordinates, mask and gate.

``f`` (B x d_s) -> ``classifier(f)`` (logits for CE) and
``g * projector(f)`` (B x K predicted coordinates ``c_hat``), where

- ``mask`` (buffer, K, float 0/1) marks the active coordinates; the loss only
  sees ``mask * c_hat`` (tcskd.train.losses);
- ``gate`` (parameter, K, all ones, never updated by the optimizer) exists so
  that ``dL/dg`` measures each coordinate's importance;
- ``importance`` (buffer, K) accumulates ``|dL/dg|`` (or per-coordinate
  squared error) between two selection steps (tcskd.train.selection).

Everything the tailoring needs lives in this module's state dict, so a
checkpoint carries it. With ``k = None`` (method ``ce``) the head is only the
classifier. At inference the head reduces to ``classifier``: the projector,
mask and gate are a training-time device (tcskd.train.export drops them).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class TCSHead(nn.Module):
    def __init__(self, feature_dim: int, num_classes: int, k: int | None) -> None:
        super().__init__()
        self.classifier = nn.Linear(feature_dim, max(1, num_classes))
        self.k = k
        if k:
            self.projector: nn.Linear | None = nn.Linear(feature_dim, k)
            self.gate = nn.Parameter(torch.ones(k))
            self.register_buffer("mask", torch.ones(k))
            self.register_buffer("importance", torch.zeros(k))
        else:
            self.projector = None

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.classifier(f)
        if self.projector is None:
            return logits, None
        return logits, self.gate * self.projector(f)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the optimizer updates (the gate only measures importance)."""
        params = list(self.classifier.parameters())
        if self.projector is not None:
            params += list(self.projector.parameters())
        return params

    @property
    def active(self) -> int:
        return int(self.mask.sum().item()) if self.k else 0
