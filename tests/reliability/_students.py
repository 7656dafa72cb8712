"""A tiny student for ``--student python:reliability._students:tiny`` (fast on the CPU)."""

import torch.nn as nn


class Tiny(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = 8

    def forward(self, x):
        return self.body(x)


def tiny(num_classes: int, in_channels: int) -> nn.Module:
    return Tiny(in_channels)


SPEC = "python:reliability._students:tiny"
