"""Multi-head attention over ``[memory; segment]`` with Transformer-XL relative positions.

Shape legend: B batch, T segment (queries), P prefix keys (memory and any cached part of the
current segment), K = P + T keys, H heads, D head dim, E model width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from memtx.ops.attention import relative_memory_attention
from memtx.ops.norm import layer_norm_linear

KeyValue = tuple[Tensor, Tensor]  # (B, H, N, D) keys and values


class KeyValueCache:
    """Keys and values of a growing prefix (a memory, then the tokens streamed so far) in
    preallocated (B, H, capacity, D) buffers.

    Streaming decoders append one token's key and value per layer per step. Concatenating them
    to the cached ones copies every cached key and value each step, memory traffic that at
    batch 1 costs as much as the attention itself; :meth:`extend` writes the new ones in place
    and returns views of everything so far.

    Args:
        capacity: the most keys the cache will hold (memory plus one segment).
        prefix: optional keys and values (B, H, P, D) to start from.
    """

    def __init__(self, capacity: int, prefix: KeyValue | None = None) -> None:
        self.capacity = capacity
        self.length = 0
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        if prefix is not None and prefix[0].shape[-2] > 0:
            self.extend(*prefix)

    def extend(self, k: Tensor, v: Tensor) -> KeyValue:
        """Append keys and values (B, H, N, D); returns views (B, H, length, D) of all held."""
        end = self.length + k.shape[-2]
        if end > self.capacity:
            raise ValueError(f"key/value cache holds at most {self.capacity} keys, asked for {end}")
        if self._k is None:
            self._k = k.new_empty(*k.shape[:2], self.capacity, k.shape[-1])
            self._v = v.new_empty(*v.shape[:2], self.capacity, v.shape[-1])
        assert self._v is not None
        self._k[:, :, self.length : end].copy_(k)
        self._v[:, :, self.length : end].copy_(v)
        self.length = end
        return self.kv

    @property
    def kv(self) -> KeyValue:
        """Views (B, H, length, D) of the keys and values held."""
        if self._k is None or self._v is None:
            raise ValueError("the key/value cache is empty")
        return self._k[:, :, : self.length], self._v[:, :, : self.length]


def with_prefix(prefix: KeyValue | KeyValueCache | None, k: Tensor, v: Tensor) -> KeyValue:
    """Keys and values (B, H, P + N, D) of ``[prefix; new]`` for new ones (B, H, N, D): the
    new ones alone without a prefix, a concatenation with a (k, v) pair, or appended in place
    to a :class:`KeyValueCache` (streaming)."""
    if isinstance(prefix, KeyValueCache):
        return prefix.extend(k, v)
    if prefix is None or prefix[0].shape[-2] == 0:
        return k, v
    return torch.cat((prefix[0], k), dim=-2), torch.cat((prefix[1], v), dim=-2)


def project_positions(to_r: nn.Linear, pos_emb: Tensor, heads: int) -> Tensor:
    """(H, K, D) per-head projections ``to_r(pos_emb)`` of position embeddings (K, E), stored
    head-major: a stream slices a few more distances per token, and for one batch row the
    attention then uses the slice as it is instead of copying it every token."""
    return to_r(pos_emb).view(pos_emb.shape[0], heads, -1).transpose(0, 1).contiguous()


class RelativeMemoryAttention(nn.Module):
    """Scores ``(q_i + u).k_j + (q_i + v).r_{i-j}`` (Dai et al. 2019), causal over the keys.

    Keys and values of the prefix are passed in already projected (``kv_prefix``), so that
    training (prefix = memory, projected once per segment) and streaming generation (prefix =
    memory plus the tokens generated so far in this segment, projected once each, held in a
    :class:`KeyValueCache`) share this one code path.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int | None = None,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        checkpoint_attention: bool = False,
    ) -> None:
        super().__init__()
        head_dim = head_dim or dim // heads
        self.checkpoint_attention = checkpoint_attention
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.scale = 1.0 / math.sqrt(head_dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_r = nn.Linear(dim, inner, bias=False)
        self.content_bias = nn.Parameter(torch.zeros(heads, head_dim))  # u
        self.position_bias = nn.Parameter(torch.zeros(heads, head_dim))  # v
        self.to_out = nn.Linear(inner, dim)
        self.attn_dropout = attn_dropout
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def project_kv(self, h: Tensor, norm: nn.LayerNorm | None = None) -> KeyValue:
        """Keys and values (B, H, N, D) of normalised hidden states ``h`` (B, N, E), or of
        ``norm(h)`` (fused with the projection for a memory: see
        :func:`memtx.ops.norm.layer_norm_linear`)."""
        kv = self.to_kv(h) if norm is None else layer_norm_linear(h, norm, self.to_kv)
        k, v = kv.chunk(2, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    def project_positions(self, pos_emb: Tensor) -> Tensor:
        """(H, K, D) projections of the sinusoids (K, E) of distances K-1, ..., 0."""
        return project_positions(self.to_r, pos_emb, self.heads)

    def forward(
        self,
        x: Tensor,
        kv_prefix: KeyValue | KeyValueCache | None,
        r: Tensor,
        key_valid: Tensor | None = None,
        score_bias: Tensor | None = None,
    ) -> tuple[Tensor, KeyValue]:
        """
        Args:
            x: (B, T, E) normalised segment hidden states.
            kv_prefix: keys and values (B, H, P, D) of the positions before the segment, or
                None; or a :class:`KeyValueCache` of them, to which the segment's own keys and
                values are appended.
            r: (H, K, D) from :meth:`project_positions` for K = P + T keys.
            key_valid: optional (B, K) bool; False marks keys to ignore (empty memory).
            score_bias: optional extra additive score bias broadcastable to (B, H, T, K), e.g.
                the log of a soft mask (``log m`` multiplies attention weights by ``m`` and
                renormalises).

        Returns:
            The (B, T, E) output and the segment's own keys and values (B, H, T, D).
        """
        q = self._split_heads(self.to_q(x))  # (B, H, T, D)
        k_new, v_new = self.project_kv(x)
        k, v = with_prefix(kv_prefix, k_new, v_new)
        out = relative_memory_attention(
            q + self.content_bias[:, None, :],
            q + self.position_bias[:, None, :],
            k,
            v,
            r,
            key_valid=key_valid,
            scale=self.scale,
            dropout_p=self.attn_dropout if self.training else 0.0,
            score_bias=score_bias,
            recompute=self.checkpoint_attention,
        )
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.dropout(self.to_out(out)), (k_new, v_new)
