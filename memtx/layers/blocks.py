"""Transformer blocks shared by several architectures.

Shape legend: B batch, T segment, M memory, K = M + T keys, H heads, D head dim, E model width.
"""

from __future__ import annotations

from torch import Tensor, nn

from memtx.layers.attention import KeyValue, KeyValueCache, RelativeMemoryAttention
from memtx.layers.feedforward import FeedForward


class RelativeMemoryBlock(nn.Module):
    """Pre-norm Transformer-XL block: ``x + attn(norm(x) | norm(memory))``, then
    ``x + ff(norm(x))``. The memory holds un-normalised layer inputs; this block normalises them
    with the same norm as its own input before projecting keys and values."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int | None = None,
        *,
        ff_mult: int = 4,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        checkpoint_attention: bool = False,
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = RelativeMemoryAttention(
            dim, heads, head_dim, dropout=dropout, attn_dropout=attn_dropout,
            checkpoint_attention=checkpoint_attention,
        )
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult, dropout=dropout)
        self.ff_dropout = nn.Dropout(dropout)

    def memory_kv(self, mem: Tensor) -> KeyValue:
        """Keys and values (B, H, M, D) of this layer's memory (B, M, E)."""
        return self.attn.project_kv(mem, norm=self.attn_norm)

    def forward(
        self,
        x: Tensor,
        kv_prefix: KeyValue | KeyValueCache | None,
        r: Tensor,
        key_valid: Tensor | None,
        score_bias: Tensor | None = None,
    ) -> tuple[Tensor, KeyValue]:
        """(B, T, E) -> (B, T, E) and the segment's keys and values (see
        :meth:`RelativeMemoryAttention.forward` for the arguments)."""
        attn_out, kv = self.attn(self.attn_norm(x), kv_prefix, r, key_valid, score_bias)
        x = x + attn_out
        x = x + self.ff_dropout(self.ff(self.ff_norm(x)))
        return x, kv
