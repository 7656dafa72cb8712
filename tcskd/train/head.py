"""The TCS head: classifier + projector onto the teacher's coordinates, mask and gate.

``f`` (B x d_s) -> ``c_hat = g * projector(f)`` (B x K predicted coordinates)
and logits for CE, read either from the feature (``classify_from='feature'``:
``classifier(f)``) or from the active predicted coordinates
(``classify_from='coords'``: ``classifier(m * c_hat)``, the student's feature
expressed in the teacher's coordinate system), where

- ``mask`` (buffer, K, float 0/1) marks the active coordinates; the loss only
  sees ``mask * c_hat`` (tcskd.train.losses);
- ``gate`` (parameter, K, all ones, never updated by the optimizer) exists so
  that ``dL/dg`` measures each coordinate's importance;
- ``importance`` (buffer, K) accumulates the tailoring criterion between two
  selection steps (tcskd.train.selection).

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

CLASSIFY_FROM = ("feature", "coords")


class TCSHead(nn.Module):
    def __init__(self, feature_dim: int, num_classes: int, k: int | None, classify_from: str = "feature") -> None:
        super().__init__()
        if classify_from not in CLASSIFY_FROM:
            raise ValueError(f"unknown classify_from '{classify_from}' (choose {', '.join(CLASSIFY_FROM)})")
        self.k = k
        self.classify_from = classify_from if k else "feature"
        self.classifier = nn.Linear(k if self.classify_from == "coords" else feature_dim, max(1, num_classes))
        if k:
            self.projector: nn.Linear | None = nn.Linear(feature_dim, k)
            self.gate = nn.Parameter(torch.ones(k))
            self.register_buffer("mask", torch.ones(k))
            self.register_buffer("importance", torch.zeros(k))
        else:
            self.projector = None

    def forward(self, f: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, c_hat); ``mask`` replaces ``self.mask`` (the loop passes a copy to differentiate)."""
        if self.projector is None:
            return self.classifier(f), None
        c_hat = self.gate * self.projector(f)
        if self.classify_from == "coords":
            m = self.mask if mask is None else mask
            return self.classifier(c_hat * m.to(c_hat.dtype)), c_hat
        return self.classifier(f), c_hat

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the optimizer updates (the gate only measures importance)."""
        params = list(self.classifier.parameters())
        if self.projector is not None:
            params += list(self.projector.parameters())
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
