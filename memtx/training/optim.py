"""AdamW with decoupled weight-decay groups, and a warmup + cosine learning-rate schedule.

Weight decay shrinks matrices that mix features (linear and attention projections). It is not
applied to norms' gains and biases (decaying them towards zero only fights the normalisation),
nor to embedding tables (a byte seen rarely would have its row decayed towards zero between
updates), nor to any parameter whose name ends in ``bias`` (Transformer-XL's ``u``/``v`` content and
position biases are 2-d) or that is 1-d.

The schedule is a pure function of the step (:func:`lr_at`), so a resumed run only needs the
step to be back on the same curve; nothing about it has to be unpickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from memtx.errors import ConfigError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` (matrices of linear layers) and ``no_decay`` (the rest).

    A parameter shared by two modules (tied input/output embeddings) is listed once, in
    ``no_decay`` because it is an embedding.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            no_decay_ids.add(id(module.weight))
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)) or "Norm" in type(module).__name__:
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in no_decay_ids or param.dim() < 2 or name.endswith("bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`. The learning rate is overwritten every step from the
    :class:`Schedule` (``train_step(lr=...)``); ``lr`` here is only the starting value."""
    if lr <= 0:
        raise ConfigError(f"lr={lr} must be positive")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


@dataclass(frozen=True)
class Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to
    ``lr * min_lr_ratio`` at ``total_steps`` (and flat after it)."""

    lr: float
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.total_steps < 1:
            raise ConfigError(f"steps={self.total_steps} must be >= 1")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer update number ``step`` (0-based)."""
        return lr_at(step, self.lr, self.warmup_steps, self.total_steps, self.min_lr_ratio)

    def state_dict(self) -> dict[str, float | int]:
        return {
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
        }


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Warmup + cosine learning rate at update ``step`` (0-based); see :class:`Schedule`."""
    min_lr = lr * min_lr_ratio
    if step < warmup_steps:
        # (step + 1): the first update already moves, instead of wasting a step at lr 0
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
