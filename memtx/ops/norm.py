"""Normalisation ops as single autograd nodes, each beside its plain reference.

``rms_norm(x, weight, scale)`` is ``x / max(||x||, eps) * scale * weight`` over the last dim
(with ``scale = sqrt(dim)`` this is ``x / rms(x) * weight``). Autograd through the reference
expression keeps several full-size intermediates and takes about a dozen passes over the input
forward and backward; the fused node saves only the input and one number per row, and its
backward is six passes.

``layer_norm_linear(x, norm, linear)`` is ``linear(norm(x))`` for an input that is a constant
(a memory: the stored states of an earlier segment): its backward needs the gradients of the
norm's gain and bias and of the linear layer, never the gradient of the normalised input.
Through autograd that gradient is still formed, one matmul as large as the layer's forward, to
reach the gain and bias; the fused node gets all three from the one weight-gradient matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from memtx.ops.autocast import autocast_enabled

__all__ = ["layer_norm_linear", "layer_norm_linear_fuses", "layer_norm_linear_ref", "rms_norm",
           "rms_norm_ref"]

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


class _LayerNormLinear(torch.autograd.Function):
    """``linear(layer_norm(x))`` with ``x`` constant. With ``u`` the normalised rows, ``g`` the
    output gradient (N, F), ``G = g^T u`` (F, E) and ``s = g^T 1`` (F,):
    ``dW = G * gamma + s beta^T``, ``dgamma = sum_f W * G``, ``dbeta = W^T s``, ``dbias = s``.
    Saves nothing beside ``x`` (a memory, kept anyway) but its per-row mean and 1/std."""

    @staticmethod
    def forward(ctx, x, gamma, beta, weight, bias, eps):
        normed, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), gamma, beta, eps)
        ctx.save_for_backward(x, mean, rstd, gamma, beta, weight)
        ctx.has_bias = bias is not None
        return F.linear(normed, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, mean, rstd, gamma, beta, weight = ctx.saved_tensors
        dim, features = x.shape[-1], weight.shape[0]
        unit = (x - mean).mul_(rstd).reshape(-1, dim)
        grad = grad.reshape(-1, features)
        g_u = grad.t() @ unit  # (F, E)
        sums = grad.sum(0)  # (F,)
        grad_weight = g_u * gamma
        grad_weight.addr_(sums, beta)
        grad_gamma = (g_u.mul_(weight)).sum(0)
        grad_beta = sums @ weight
        return (None, grad_gamma, grad_beta, grad_weight, sums if ctx.has_bias else None, None)


def layer_norm_linear_fuses(x: Tensor, norm: torch.nn.LayerNorm, linear: torch.nn.Linear) -> bool:
    """Whether :func:`layer_norm_linear` runs as one node here: under autograd, for an ``x``
    that needs no gradient, an affine LayerNorm over the last dim, and one dtype throughout
    (no autocast). Such a node keeps only ``x`` and two numbers per row for backward, so
    recomputing it (checkpointing) saves nothing."""
    return (
        torch.is_grad_enabled()
        and not x.requires_grad
        and norm.elementwise_affine and norm.weight is not None and norm.bias is not None
        and len(norm.normalized_shape) == 1
        and x.dtype == norm.weight.dtype == linear.weight.dtype
        and not autocast_enabled(x.device.type)
    )


def layer_norm_linear(x: Tensor, norm: torch.nn.LayerNorm, linear: torch.nn.Linear) -> Tensor:
    """``linear(norm(x))``; one autograd node where :func:`layer_norm_linear_fuses` (see the
    module docstring), else the plain expression."""
    if not layer_norm_linear_fuses(x, norm, linear):
        return layer_norm_linear_ref(x, norm, linear)
    return _LayerNormLinear.apply(x, norm.weight, norm.bias, linear.weight, linear.bias,
                                  norm.eps)


def layer_norm_linear_ref(x: Tensor, norm: torch.nn.LayerNorm, linear: torch.nn.Linear) -> Tensor:
    """Reference for :func:`layer_norm_linear`: the two modules under autograd."""
    return linear(norm(x))
