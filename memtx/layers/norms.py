"""Normalisation layers."""

from __future__ import annotations

import torch.nn.functional as F
import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (Zhang & Sennrich 2019), written as
    ``x / ||x|| * sqrt(dim) * gain`` (the GateLoop reference's form; equal to
    ``x / rms(x) * gain`` up to the epsilon that guards a zero vector)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.weight
