"""Helpers for tests: comparing fast ops with their references, and a synthetic text corpus."""

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


_WORDS = ("the of and to in is was that for on with as by at from his her they which memory "
          "segment stream model attention layer token byte transformer recall copy").split()


def make_text(num_bytes: int, seed: int = 0) -> bytes:
    """Deterministic word salad of ``num_bytes`` bytes: learnable structure (words, spaces,
    line breaks) for tests that need a text corpus without any file."""
    import random

    rng = random.Random(seed)
    out = []
    size = 0
    while size < num_bytes:
        word = rng.choice(_WORDS) + (".\n" if rng.random() < 0.1 else " ")
        out.append(word)
        size += len(word)
    return "".join(out).encode()[:num_bytes]
