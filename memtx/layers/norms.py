"""Normalisation layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from memtx.ops.norm import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (Zhang & Sennrich 2019), written as
    ``x / ||x|| * sqrt(dim) * gain`` (the GateLoop reference's form; equal to
    ``x / rms(x) * gain`` up to the epsilon that guards a zero vector), one autograd node
    (:func:`memtx.ops.norm.rms_norm`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.scale)
