"""Helpers for comparing fast ops with their references (used by memtx's tests)."""

from __future__ import annotations

import torch
from torch import Tensor


def rel_rms(actual: Tensor, expected: Tensor) -> float:
    """``rms(actual - expected) / rms(expected)``: a scale-free error (0 for equal tensors)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    denom = expected.pow(2).mean().sqrt().clamp(min=1e-30)
    return float((actual - expected).pow(2).mean().sqrt() / denom)


def grads(outputs: Tensor, inputs: list[Tensor], seed: int = 0) -> list[Tensor]:
    """Gradients of ``(outputs * w).sum()`` for a fixed random ``w`` (a generic loss)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(outputs.shape, generator=g, dtype=outputs.dtype).to(outputs.device)
    return list(torch.autograd.grad((outputs * weight).sum(), inputs, allow_unused=False))
