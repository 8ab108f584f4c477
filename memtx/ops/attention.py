"""Causal attention of a segment over ``[memory; segment]``.

Layout: ``(B, H, T, D)`` for queries and ``(B, H, K, D)`` for keys and values, where K = M + T
keys are the M memory positions followed by the T segment positions. Query ``i`` sits at key
position ``M + i``, so the causal mask is aligned to the lower right: query ``i`` may see key
``j`` iff ``j <= i + K - T``.

Shape legend: B batch, H heads, T queries (segment), K keys (memory + segment), D head dim.

:func:`memory_attention` runs on :func:`torch.nn.functional.scaled_dot_product_attention` (fused
kernels on CPU and GPU); :func:`memory_attention_ref` is the plain softmax it must equal.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right


def causal_mask(num_queries: int, num_keys: int, device: torch.device | None = None) -> Tensor:
    """Boolean (T, K) mask, True where query i may attend to key j (lower-right aligned)."""
    if num_keys < num_queries:
        raise ValueError(f"need at least as many keys as queries, got K={num_keys} < T={num_queries}")
    return _causal_mask(num_queries, num_keys, torch.device(device or "cpu"))


# cached: every layer of every step asks for the same few shapes (callers never write to them)
@functools.lru_cache(maxsize=64)
def _causal_mask(num_queries: int, num_keys: int, device: torch.device) -> Tensor:
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(
        num_keys - num_queries
    )


@functools.lru_cache(maxsize=64)
def _causal_blocked(num_queries: int, num_keys: int, device: torch.device) -> Tensor:
    return ~_causal_mask(num_queries, num_keys, device)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "memory_attention expects (B, H, T, D) tensors, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or k.shape[-2] < q.shape[-2]:
        raise ValueError(
            f"keys {tuple(k.shape)} and values {tuple(v.shape)} must share (B, H, K) with "
            f"K >= T = {q.shape[-2]}"
        )


def memory_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    key_valid: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Causal attention of T queries over K = M + T keys (fast path).

    Args:
        q: (B, H, T, D) queries.
        k, v: (B, H, K, D) keys and values, memory first. H may be 1 for shared key/value heads.
        bias: optional additive score bias broadcastable to (B, H, T, K), already scaled
            (relative-position terms).
        key_valid: optional (B, K) bool, False for keys that must never be seen (empty memory
            slots). Every query must keep at least its own key, so rows never go empty.
        scale: score scale, default ``1/sqrt(D)``.
        dropout_p: attention dropout probability (pass 0.0 in eval).

    Returns:
        (B, H, T, D) attention output.
    """
    _check_shapes(q, k, v)
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    if k.shape[1] != q.shape[1]:
        k = k.expand(-1, q.shape[1], -1, -1)
        v = v.expand(-1, q.shape[1], -1, -1)
    if bias is None and key_valid is None:
        if num_queries == num_keys:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale
            )
        if num_queries == 1:  # one new token sees every key: no mask at all
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(num_queries, num_keys),
            dropout_p=dropout_p, scale=scale,
        )
    # With a score bias (relative positions) the fused kernels would fall back to an unfused
    # path anyway; writing it out lets the bias ride in the score matmul (baddbmm).
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    batch, heads, _, dim = q.shape
    if bias is None:
        bias = torch.zeros((), dtype=q.dtype, device=q.device)
    bias = bias.to(q.dtype).expand(batch, heads, num_queries, num_keys)
    scores = torch.baddbmm(
        bias.reshape(-1, num_queries, num_keys),
        q.reshape(-1, num_queries, dim),
        k.reshape(-1, num_keys, dim).transpose(1, 2),
        alpha=scale,
    ).view(batch, heads, num_queries, num_keys)
    # masking the fresh scores in place saves a masked copy of the bias, forward and backward
    blocked = _causal_blocked(num_queries, num_keys, q.device)  # (T, K)
    if key_valid is not None:
        blocked = blocked | ~key_valid[:, None, None, :]  # (B, 1, T, K)
    scores = scores.masked_fill_(blocked, float("-inf")).view(-1, num_queries, num_keys)
    weights = F.dropout(scores.softmax(dim=-1), p=dropout_p) if dropout_p else scores.softmax(dim=-1)
    out = torch.bmm(weights, v.reshape(-1, num_keys, v.shape[-1]))
    return out.view(batch, heads, num_queries, -1)


def memory_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    key_valid: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Reference for :func:`memory_attention`: explicit scores, mask and softmax (no dropout)."""
    _check_shapes(q, k, v)
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q, k.expand(-1, q.shape[1], -1, -1)) * scale
    if bias is not None:
        scores = scores + bias
    allowed = torch.zeros(num_queries, num_keys, dtype=torch.bool, device=q.device)
    for i in range(num_queries):
        allowed[i, : i + num_keys - num_queries + 1] = True
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = scores.softmax(dim=-1)
    return torch.einsum("bhij,bhjd->bhid", weights, v.expand(-1, q.shape[1], -1, -1))
