"""Root-mean-square normalisation as one autograd node, beside its plain reference.

``rms_norm(x, weight, scale)`` is ``x / max(||x||, eps) * scale * weight`` over the last dim
(with ``scale = sqrt(dim)`` this is ``x / rms(x) * weight``). Autograd through the reference
expression keeps several full-size intermediates and takes about a dozen passes over the input
forward and backward; the fused node saves only the input and one number per row, and its
backward is six passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rms_norm", "rms_norm_ref"]

EPS = 1e-12  # F.normalize's default: a zero row stays zero


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: float) -> Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        c = scale / norm.clamp_min(EPS)  # (..., 1)
        ctx.save_for_backward(x, weight, c, norm)
        ctx.scale = scale
        return torch.mul(x, c).mul_(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, weight, c, norm = ctx.saved_tensors  # one dtype (see rms_norm)
        dim = x.shape[-1]
        # y = c x w with c = scale / ||x||: with the unit vector u = x / ||x|| = x c / scale,
        # dL/dx = c (g w - u (g w . u)), the second term absent where the norm was clamped (c
        # constant there). Written with u, nothing grows like c^3 for tiny rows.
        gw = grad * weight
        u = x * (c / ctx.scale)
        dot = torch.linalg.vecdot(gw, u).unsqueeze(-1).masked_fill_(norm <= EPS, 0.0)
        grad_x = gw.sub_(u.mul_(dot)).mul_(c)
        grad_w = c.reshape(1, -1) @ (grad * x).reshape(-1, dim)
        return grad_x, grad_w.reshape(dim), None


def rms_norm(x: Tensor, weight: Tensor, scale: float) -> Tensor:
    """``x / max(||x||, 1e-12) * scale * weight`` over the last dim, as one autograd node.

    Args:
        x: (..., D).  weight: (D,).  scale: a constant, e.g. ``sqrt(D)``.
    """
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight must have shape ({x.shape[-1]},) to match the last dim of x "
            f"{tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype:  # e.g. bfloat16 activations: autograd's type promotion
        return rms_norm_ref(x, weight, scale)
    return _RMSNorm.apply(x, weight, scale)


def rms_norm_ref(x: Tensor, weight: Tensor, scale: float) -> Tensor:
    """Reference for :func:`rms_norm`: the plain expression under autograd."""
    return F.normalize(x, dim=-1, eps=EPS) * scale * weight
