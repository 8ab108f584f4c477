"""Positions: sinusoids and Transformer-XL relative-position scores.

Transformer-XL (Dai et al. 2019) scores query i against key j as

    (q_i + u) . k_j  +  (q_i + v) . r_{i-j}

where r_d is a learned projection of the sinusoid of the distance d. The second term is computed
for all distances at once as one matmul against the K embeddings of distances K-1, ..., 0
(descending) and then *shifted* so that column j holds distance ``i + K - T - j`` (query i sits at
key position ``M + i``). :func:`rel_shift` does the shift as a strided view;
:func:`relative_position_scores_ref` builds the distance matrix explicitly.

Shape legend: B batch, H heads, T queries, K keys (memory + segment), D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sinusoid(positions: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding ``[sin(p w), cos(p w)]`` of shape (*positions.shape, dim).

    Frequencies ``w_k = 10000^(-2k/dim)`` as in Vaswani et al. and Transformer-XL.
    """
    if dim % 2:
        raise ValueError(f"sinusoid dimension must be even, got {dim}")
    inv_freq = 1.0 / (
        10000 ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def relative_distances(num_keys: int, device: torch.device | None = None) -> Tensor:
    """The distances K-1, ..., 0 (descending) whose embeddings :func:`rel_shift` expects."""
    return torch.arange(num_keys - 1, -1, -1, device=device)


def rel_shift(scores: Tensor) -> Tensor:
    """Align per-distance scores to (query, key) pairs.

    Args:
        scores: (..., T, K + 1) where column c < K holds the score of distance ``K - 1 - c``
            and the last column is padding (any value).

    Returns:
        A (..., T, K) strided view where entry (i, j) holds the score of distance
        ``i + K - T - j``, i.e. ``scores[..., i, j + T - 1 - i]``. Entries with a negative
        distance (keys after the query, j > i + K - T) read other entries or the padding: the
        causal mask must remove them.

    Element (i, j) of the result lives at flat offset ``(T - 1) + i K + j`` of each (T, K + 1)
    matrix, so the shift is a view with row stride K. The padding column keeps rows from
    overlapping, which keeps the backward pass a plain strided copy.
    """
    scores = scores.contiguous()
    *batch, num_queries, padded_keys = scores.shape
    num_keys = padded_keys - 1
    strides = list(scores.stride()[:-2]) + [num_keys, 1]
    return scores.as_strided(
        (*batch, num_queries, num_keys), strides, scores.storage_offset() + num_queries - 1
    )


def relative_position_scores(q: Tensor, r: Tensor) -> Tensor:
    """``out[b, h, i, j] = q[b, h, i] . r[h, i + K - T - j]`` for keys at or before the query.

    Args:
        q: (B, H, T, D) queries (with the position bias ``v`` already added).
        r: (H, K, D) projected embeddings of distances K-1, ..., 0 (descending).

    Returns:
        (B, H, T, K); entries of keys after the query are arbitrary (masked later).
    """
    if q.shape[-2] == 1:  # a single query sits at the last position: already aligned
        return torch.matmul(q, r.transpose(-1, -2))
    # a zero row appended to r gives the score matrix the padding column rel_shift needs
    r_padded = torch.cat((r, r.new_zeros(r.shape[0], 1, r.shape[2])), dim=1)  # (H, K+1, D)
    return rel_shift(torch.matmul(q, r_padded.transpose(-1, -2)))


def relative_position_scores_ref(q: Tensor, r: Tensor) -> Tensor:
    """Reference for :func:`relative_position_scores`: gathers r at the explicit distance
    matrix; entries of keys after the query are 0."""
    num_queries, num_keys = q.shape[-2], r.shape[-2]
    i = torch.arange(num_queries, device=q.device)[:, None]
    j = torch.arange(num_keys, device=q.device)[None, :]
    distance = i + num_keys - num_queries - j  # (T, K)
    column = (num_keys - 1 - distance).clamp(0, num_keys - 1)  # where r stores that distance
    r_pairs = r[:, column]  # (H, T, K, D)
    out = torch.einsum("bhid,hijd->bhij", q, r_pairs)
    return out.masked_fill(distance < 0, 0.0)


def gather_position_scores(q: Tensor, r: Tensor, distances: Tensor) -> Tensor:
    """``out[b, h, i, j] = q[b, h, i] . r[h, distances[b, i, j]]``.

    Args:
        q: (B, H, T, D) queries (position bias added and scale folded in).
        r: (H, N, D) projected embeddings of distances 0, 1, ..., N-1 (ascending).
        distances: (B, T, K) long in [0, N).

    One (T, N) matmul per head and a gather: the cost follows the oldest distance in use, and
    each (query, key) pair reads its own distance, which a shift of contiguous distances cannot
    do once entries have been dropped.
    """
    table = torch.matmul(q, r.transpose(-1, -2))  # (B, H, T, N)
    index = distances[:, None].expand(-1, q.shape[1], -1, -1)  # (B, H, T, K), no copy
    return torch.gather(table, -1, index)


def gather_position_scores_ref(q: Tensor, r: Tensor, distances: Tensor) -> Tensor:
    """Reference for :func:`gather_position_scores`: an explicit loop over rows and pairs."""
    batch, heads, queries, _ = q.shape
    out = q.new_zeros(batch, heads, queries, distances.shape[-1])
    for b in range(batch):
        for i in range(queries):
            for j in range(distances.shape[-1]):
                out[b, :, i, j] = (q[b, :, i] * r[:, int(distances[b, i, j])]).sum(-1)
    return out


def rotary(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotary position embedding (Su et al. 2021) on interleaved pairs of the last dimension.

    Pair ``(x[2k], x[2k+1])`` at position ``p`` is rotated by the angle ``p * theta^(-2k/D)``.

    Args:
        x: (..., T, D) with D even.
        positions: (T,) positions of the T rows.
    """
    dim = x.shape[-1]
    if dim % 2:
        raise ValueError(f"rotary embedding needs an even dimension, got {dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq  # (T, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    pairs = x.unflatten(-1, (dim // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2)
