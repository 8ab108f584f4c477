"""Gated residual connections: GRU or nBRC cells in place of ``x + f(x)``, optional Mogrifier.

Used by the Compressive Transformer (GRU gating, Parisotto et al. 2019 "Stabilizing
Transformers for RL") and Memory Transformer-XL (neuromodulated bistable recurrent cells,
Vecoven et al. 2020). Shape legend: N any number of leading positions, E model width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NBRC(nn.Module):
    """Neuromodulated bistable recurrent cell (Vecoven et al. 2020):

    ``a = 1 + tanh(Ua x + Wa h)``, ``c = sigmoid(Uc x + Wc h)``,
    ``h' = c * h + (1 - c) * tanh(U x + a * h)``.
    """

    def __init__(self, dim_in: int, dim_hidden: int) -> None:
        super().__init__()
        self.Ua = nn.Linear(dim_in, dim_hidden)
        self.Wa = nn.Linear(dim_in, dim_hidden)
        self.Uc = nn.Linear(dim_in, dim_hidden)
        self.Wc = nn.Linear(dim_in, dim_hidden)
        self.U = nn.Linear(dim_in, dim_hidden)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        a = 1 + torch.tanh(self.Ua(x) + self.Wa(h))
        c = torch.sigmoid(self.Uc(x) + self.Wc(h))
        return c * h + (1 - c) * torch.tanh(self.U(x) + a * h)


def _maybe_factorised(dim_in: int, dim_out: int, rank: int | None) -> nn.Module:
    if rank is None:
        return nn.Linear(dim_in, dim_out)
    if not (rank < dim_in and rank < dim_out):
        raise ValueError(f"Mogrifier rank {rank} must be below the width {min(dim_in, dim_out)}")
    return nn.Sequential(nn.Linear(dim_in, rank), nn.Linear(rank, dim_out))


class Mogrifier(nn.Module):
    """Mogrifier gating (Melis et al. 2020): inputs and hidden state scale each other in turn,
    ``x <- 2 sigmoid(Q h) * x`` on even rounds and ``h <- 2 sigmoid(R x) * h`` on odd ones.

    Args:
        dim: width of both inputs.
        iters: number of alternating rounds (> 1).
        rank: if set, Q and R are factorised through this rank.
    """

    def __init__(self, dim: int, iters: int = 5, rank: int | None = None) -> None:
        super().__init__()
        if iters < 2:
            raise ValueError(f"Mogrifier needs at least 2 rounds, got iters={iters}")
        self.iters = iters
        self.Q = _maybe_factorised(dim, dim, rank)
        self.R = _maybe_factorised(dim, dim, rank)

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        for i in range(self.iters):
            if i % 2 == 0:
                x = 2 * torch.sigmoid(self.Q(h)) * x
            else:
                h = 2 * torch.sigmoid(self.R(x)) * h
        return x, h


class GatedResidual(nn.Module):
    """``cell(f(x), x)`` instead of ``x + f(x)``: the branch output is the cell's input and the
    residual stream its hidden state.

    Args:
        dim: model width.
        cell: ``"gru"`` (``nn.GRUCell``) or ``"nbrc"`` (:class:`NBRC`).
        mogrify: mix branch and residual with a :class:`Mogrifier` (rank ``dim // 4``) first.
    """

    def __init__(self, dim: int, cell: str = "gru", mogrify: bool = False) -> None:
        super().__init__()
        if cell == "gru":
            self.cell: nn.Module = nn.GRUCell(dim, dim)
        elif cell == "nbrc":
            self.cell = NBRC(dim, dim)
        else:
            raise ValueError(f"unknown gating cell {cell!r}; use 'gru' or 'nbrc'")
        self.mogrifier = Mogrifier(dim, rank=dim // 4) if mogrify else None

    def forward(self, branch: Tensor, residual: Tensor) -> Tensor:
        """(..., E) branch output and residual -> (..., E) gated output."""
        if self.mogrifier is not None:
            branch, residual = self.mogrifier(branch, residual)
        shape = residual.shape
        out = self.cell(branch.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1]))
        return out.reshape(shape)
