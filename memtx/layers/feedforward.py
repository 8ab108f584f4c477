"""Position-wise feed-forward block."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FeedForward(nn.Module):
    """``w2(dropout(act(w1 x)))``, or with ``glu=True`` ``w2(dropout(act(a) * b))`` where
    ``a, b = w1 x`` (Shazeer 2020). Hidden width is ``dim * mult``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, glu: bool = False) -> None:
        super().__init__()
        hidden = dim * mult
        self.glu = glu
        self.w1 = nn.Linear(dim, hidden * (2 if glu else 1))
        self.w2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.glu:
            a, b = self.w1(x).chunk(2, dim=-1)
            h = F.gelu(a) * b
        else:
            h = F.gelu(self.w1(x))
        return self.w2(self.dropout(h))
