"""Memory Transformer-XL (lucidrains' ``memory-transformer-xl``): a short and a long memory.

Every *memory layer* keeps a short-term FIFO of the inputs it saw at the last ``mem_len``
positions (Transformer-XL's memory, a stop-gradient), and all memory layers share one long-term
memory of ``lmem_len`` slots. A memory layer's queries attend over

    [learned memory key/values; long memory; short memory; segment]

with a causal mask on the segment. After every full segment a small network *writes* the long
memory: ``mem_write_iters`` rounds of linear attention (Katharopoulos et al. 2020 style, softmax
feature maps) from the long-memory slots over the stacked layer inputs of the segment and the old
short memories (plus a depth embedding per memory layer and learned key/values), each round gated
by a neuromodulated bistable recurrent cell (nBRC, Vecoven et al. 2020) whose hidden state is
the long memory.

Gradients. The short memory is a stop-gradient, as in Transformer-XL. The long memory is
returned *with* its autograd graph: the loss of a later segment reaches the writer's parameters
through the memory it wrote, and only that way, because the writer reads the layer inputs
detached (as the seed does: the writer learns to store what later segments need, and the model
is not pushed to shape its hidden states for the writer). The training loop's "backprop through
k segments" option (``state.detach()`` every k segments) therefore decides how far back the
writer learns; with k = 1 the writer never trains.

memtx's defaults differ from the seed's skeleton, chosen by measurement: pre-norm
residuals ``x + f(norm(x))`` instead of nBRC-gated ones, a LayerNorm before the output head,
Transformer-XL's sinusoidal relative positions instead of a zero-initialised learned table, and
the memories normalised by the layer that reads them. ``MemoryXLConfig.like_seed()`` gives the
seed's choices (``memtx.from_reference`` uses them). The reason is DESIGN.md's measurement: on
English text at dim 256, depth 4 and equal budgets, models with the seed's skeleton (zero-
initialised learned positions, gated residuals, no output norm) sat at about 3.55 bpc while a
pre-norm Transformer-XL reached 2.56. ``benchmarks/memory_xl.py --quality`` repeats the
comparison for this model.

Deliberate differences from the seed (each has a test):

* The seed writes memory only when the segment is at least ``mem_len`` long, so with
  ``mem_len > seq_len`` memory is never written. memtx writes both memories after every *full*
  segment (``seq_len`` tokens), whatever ``mem_len`` is; a shorter segment (the tail of a
  stream) reads the memory but does not write it, so writes stay aligned to segments, also in
  streaming generation.
* The seed keeps the long memory's graph across segments, so a loop that calls backward every
  segment crashes at the third one; memtx leaves the cut to ``state.detach()``.
* The seed's writer merges heads with ``out.transpose(2, 3).reshape(...)``, which permutes
  features across long-memory slots; memtx merges heads per slot unless
  ``scramble_writer_heads`` asks for the seed's layout (parity with reference checkpoints).
* Rows cleared by ``state.reset(rows)`` read no long memory and restart the writer from the
  learned initial memory, exactly like a fresh stream, also with the seed's learned position
  table (whose index depends on how much memory a row holds).

Shape legend: B batch, T segment, M short memory, N long memory, S memory key/values,
L memory layers, K keys, H heads, D head dim, E model width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from memtx.config import ModelConfig
from memtx.layers.init import init_gpt2_weights, scale_residual_projections
from memtx.errors import InputError, StateError
from memtx.generation import Stream
from memtx.layers.attention import KeyValue, KeyValueCache, project_positions, with_prefix
from memtx.layers.feedforward import FeedForward
from memtx.layers.gating import NBRC, GatedResidual
from memtx.modeling import MemoryLM
from memtx.ops.attention import memory_attention, relative_memory_attention
from memtx.ops.norm import layer_norm_linear, layer_norm_linear_fuses
from memtx.ops.position import relative_distances, sinusoid
from memtx.reference import register_converter
from memtx.registry import register
from memtx.state import State, append_to_fifo, memory_field

NO_POSITION = -1  # key slot of a key without a learned position score (see learned_table_index)


# =============================================================================================
# Config and state
# =============================================================================================
@dataclass(kw_only=True)
class MemoryXLConfig(ModelConfig):
    """Memory Transformer-XL hyper-parameters (beyond :class:`memtx.config.ModelConfig`).

    Attributes:
        mem_len: short-memory positions each memory layer keeps; 0 keeps none (long memory only).
        lmem_len: slots of the long memory; at least 1 unless ``memory_layers`` is empty.
        memory_layers: 1-based indices of the layers that read and feed the memories (as in the
            seed); None means every layer, ``()`` turns memory off (a plain transformer).
        mem_write_iters: rounds of linear attention + nBRC gate per long-memory write.
        write_heads: heads of the writer's linear attention (the seed fixes 4).
        num_mem_kv: learned key/values prepended to every layer's keys and to the writer's.
        residual: ``"add"`` (pre-norm ``x + f(norm(x))``), or a cell gating branch and residual
            stream: ``"nbrc"`` (the seed) or ``"gru"`` (Parisotto et al. 2019).
        mogrify: mix branch and residual with a Mogrifier before the gate (gated residuals only).
        positions: ``"sinusoid"``: Transformer-XL relative positions (projected sinusoids, content
            and position biases) on short-memory and segment keys; ``"learned"``: the seed's
            zero-initialised per-head table over every key but the learned key/values.
        norm_memory: normalise the memories with the reading layer's norm before projecting
            them (the seed normalises only the segment).
        final_norm: LayerNorm before the output head (the seed has none).
        scramble_writer_heads: reproduce the seed's head merge in the writer (see module
            docstring); only for parity with reference checkpoints.
        ff_mult: feed-forward hidden width as a multiple of ``dim``.
        ff_glu: gated (GEGLU) feed-forward.
        one_kv_head: one key/value head shared by all query heads (Shazeer 2019).
        dropout: dropout on embeddings, attention outputs and inside the feed-forward.
        attn_dropout: dropout on attention weights.
        tie_embeddings: use the input embedding matrix as the output projection (the head keeps
            its own bias either way, as the seed's).
        checkpoint_attention: rebuild the attention weights and the normalised memory in the
            backward pass instead of keeping them (same results; at dim 256, lmem_len 256,
            batch 4 and mem_len 1024 the peak of steady-state training steps is 236 instead
            of 428 MiB, and steps take 1.11x as long, 1.07x at mem_len 256).
    """

    mem_len: int = 256
    lmem_len: int = 256
    memory_layers: tuple[int, ...] | None = None
    mem_write_iters: int = 2
    write_heads: int = 4
    num_mem_kv: int = 4
    residual: Literal["add", "gru", "nbrc"] = "add"
    mogrify: bool = False
    positions: Literal["sinusoid", "learned"] = "sinusoid"
    norm_memory: bool = True
    final_norm: bool = True
    scramble_writer_heads: bool = False
    ff_mult: int = 4
    ff_glu: bool = False
    one_kv_head: bool = False
    dropout: float = 0.0
    attn_dropout: float = 0.0
    tie_embeddings: bool = True
    checkpoint_attention: bool = False

    @classmethod
    def like_seed(cls, **overrides: Any) -> "MemoryXLConfig":
        """The seed's architecture choices (nBRC-gated residuals, learned position table, no
        output norm, un-normalised memories, untied head, no learned key/values, its writer
        head layout), updated by ``overrides``."""
        values: dict[str, Any] = dict(
            residual="nbrc", positions="learned", norm_memory=False, final_norm=False,
            scramble_writer_heads=True, tie_embeddings=False, num_mem_kv=0,
        )
        values.update(overrides)
        return cls(**values)

    def validate(self) -> None:
        super().validate()
        self.require(self.dim % self.heads == 0, "dim", f"must be divisible by heads={self.heads}")
        if self.positions == "sinusoid":
            self.require(self.dim % 2 == 0, "dim", "must be even (sinusoidal positions)")
        self.require(self.mem_len >= 0, "mem_len", "must be >= 0 (0 keeps no short memory)")
        if self.memory_layers is not None:
            layers = self.memory_layers
            self.require(
                all(1 <= layer <= self.depth for layer in layers) and len(set(layers)) == len(layers),
                "memory_layers",
                f"must list distinct layers in 1..depth={self.depth} (1-based, as the seed), "
                "or be None for every layer, or () for no memory",
            )
        if self.memory_layer_indices():
            self.require(
                self.lmem_len >= 1, "lmem_len",
                "must be at least 1 while memory is on (memory_layers=() turns memory off)",
            )
        self.require(self.mem_write_iters >= 1, "mem_write_iters", "must be at least 1")
        self.require(
            self.write_heads >= 1 and self.dim % self.write_heads == 0, "write_heads",
            f"must be a positive divisor of dim={self.dim}",
        )
        self.require(self.num_mem_kv >= 0, "num_mem_kv", "must be >= 0")
        if self.mogrify:
            self.require(
                self.residual != "add", "mogrify",
                "needs a gated residual (residual='nbrc' or 'gru'); 'add' has nothing to mogrify",
            )
            self.require(self.dim >= 8, "dim", "must be at least 8 with mogrify (rank dim // 4)")
        self.require(self.ff_mult >= 1, "ff_mult", "must be at least 1")
        self.require_probabilities("dropout", "attn_dropout")

    def memory_layer_indices(self) -> list[int]:
        """0-based indices of the memory layers, in order."""
        if self.memory_layers is None:
            return list(range(self.depth))
        return sorted(layer - 1 for layer in self.memory_layers)


@dataclass(frozen=True)
class MemoryXLState(State):
    """Short memories of the memory layers and the shared long memory.

    ``mem[l]`` holds the inputs of the l-th memory layer at the last M positions, oldest first;
    ``valid[b, m]`` is False where no position was stored yet (or the row was reset).
    ``lmem`` is the long memory, with its autograd graph when it was written under grad mode;
    ``lmem_valid[b]`` is False until the first write (and after a reset): such a row reads no
    long memory and the next write starts from the learned initial memory.
    """

    mem: Tensor = memory_field("layer", "batch", "mem", "dim")  # (L, B, M, E)
    valid: Tensor = memory_field("batch", "mem", fill=False)  # (B, M) bool
    lmem: Tensor = memory_field("batch", "lmem", "dim")  # (B, N, E)
    lmem_valid: Tensor = memory_field("batch", fill=False)  # (B,) bool


# =============================================================================================
# Positions
# =============================================================================================
def learned_table_index(slots: Tensor, first_query: int, num_queries: int, seq_len: int,
                        table_len: int) -> Tensor:
    """(B, T, K) column of the learned table that scores query i against key j, or NO_POSITION.

    The seed slices its table from ``seq_len - t`` to an end that grows with the memory a row
    holds, and shifts it Transformer-XL style. Written out, query i (its index in the segment) and the key with
    *slot* s meet at column ``seq_len - 1 - i + s``, where s depends on how much memory the
    row holds (see :meth:`MemoryXL._key_slots`). Counting only keys that exist (valid ones)
    makes a reset row equal a fresh stream. ``slots`` (B, K) holds s, or NO_POSITION for keys
    without a position score.
    """
    queries = torch.arange(first_query, first_query + num_queries, device=slots.device)
    index = (seq_len - 1 - queries)[None, :, None] + slots[:, None, :]  # (B, T, K)
    # columns past the table belong to keys after the query, which the causal mask removes
    index = index.clamp(max=table_len - 1)
    return index.masked_fill(slots[:, None, :] < 0, NO_POSITION)


def learned_positions_as_relative(table: Tensor, seq_len: int, offset: int, num_prefix: int,
                                  num_keys: int) -> Tensor:
    """The learned table as relative positions ``r`` for :func:`relative_memory_attention`,
    valid when every key exists (no empty memory slot in any row).

    Then the keys' slots are consecutive (``offset - num_prefix`` for the first of the
    ``num_prefix`` keys before the segment, ``offset + j`` for segment key j), so query i of
    the segment and key κ meet at column ``c - i + κ`` for a constant c: a relative shift.
    Keys with a negative slot (the first ``num_prefix - offset``) get no position score, the
    others are the last P keys, and the op's ``r`` (distances P-1, ..., 0) is the P columns
    that end at ``seq_len + offset``, whatever the query offset within the segment (streaming).

    Args:
        table: (H, seq_len + mem_len + lmem_len, D) learned position table.
        offset: the slot offset F of :meth:`MemoryXL._key_slots` (the same in every row).
        num_prefix: keys before the segment (learned key/values and memories).
        num_keys: all keys, ``num_prefix`` plus the segment's keys up to the last query.

    Returns:
        (H, P, D) view of the table.
    """
    num_pos = num_keys - max(0, num_prefix - offset)
    end = seq_len + offset
    return table[:, end - num_pos:end]


def learned_position_scores(q: Tensor, table: Tensor, index: Tensor) -> Tensor:
    """(B, H, T, K) scores ``q_i . table[index[b, i, j]]`` (0 where index is NO_POSITION).

    Args:
        q: (B, H, T, D) queries, already scaled.
        table: (H, P, D) learned position table.
        index: (B, T, K) from :func:`learned_table_index`.
    """
    scores = torch.matmul(q, table.transpose(-1, -2))  # (B, H, T, P)
    gather_index = index.clamp(min=0)[:, None].expand(-1, q.shape[1], -1, -1)
    out = scores.gather(-1, gather_index)
    return out.masked_fill((index < 0)[:, None], 0.0)


# =============================================================================================
# Blocks
# =============================================================================================
def _uniform_parameter(*shape: int, dim: int) -> nn.Parameter:
    """U(-1/sqrt(dim), 1/sqrt(dim)), the seed's init of its free-standing tensors."""
    bound = 1.0 / math.sqrt(dim)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class MemoryXLAttention(nn.Module):
    """Causal attention of the segment over ``[mem_kv; memory; segment]`` (memory: long then
    short memory in memory layers, nothing in the others).

    Keys and values of everything before the new tokens arrive projected (``kv_prefix``), so
    training (prefix = memory) and streaming (prefix = memory and the tokens of the segment
    already seen) share this code path.
    """

    def __init__(self, cfg: MemoryXLConfig) -> None:
        super().__init__()
        dim, heads = cfg.dim, cfg.heads
        self.heads, self.head_dim = heads, dim // heads
        self.kv_heads = 1 if cfg.one_kv_head else heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * self.kv_heads * self.head_dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.mem_kv = _uniform_parameter(cfg.num_mem_kv, dim, dim=dim)  # (S, E), pre-projection
        self.sinusoid_positions = cfg.positions == "sinusoid"
        if self.sinusoid_positions:
            self.to_r = nn.Linear(dim, dim, bias=False)
            self.content_bias = nn.Parameter(torch.zeros(heads, self.head_dim))  # u
            self.position_bias = nn.Parameter(torch.zeros(heads, self.head_dim))  # v
        self.attn_dropout = cfg.attn_dropout
        self.dropout = nn.Dropout(cfg.dropout)
        self.checkpoint = cfg.checkpoint_attention

    def _split(self, x: Tensor, heads: int) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def project_kv(self, h: Tensor, norm: nn.LayerNorm | None = None) -> KeyValue:
        """Keys and values (B, H or 1, N, D) of (B, N, E), or of ``norm(h)`` (fused with the
        projection for a memory: see :func:`memtx.ops.norm.layer_norm_linear`)."""
        kv = self.to_kv(h) if norm is None else layer_norm_linear(h, norm, self.to_kv)
        k, v = kv.chunk(2, dim=-1)
        return self._split(k, self.kv_heads), self._split(v, self.kv_heads)

    def project_positions(self, sinusoids: Tensor) -> Tensor:
        """(H, K, D) projections of the (K, E) sinusoids of distances K-1, ..., 0."""
        return project_positions(self.to_r, sinusoids, self.heads)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None,
                r: Tensor | None, table: Tensor | None, table_index: Tensor | None) -> Tensor:
        """(B, H, T, D) attention output of queries q over all keys, positions included: with
        ``r`` (projected sinusoids, or the learned table as relative positions) by the
        relative-position op, else with the learned table gathered per (query, key) pair."""
        if r is not None:  # keys before the last r.shape[-2] have no position score
            qc, qp = q, q
            if self.sinusoid_positions:
                qc, qp = q + self.content_bias[:, None], q + self.position_bias[:, None]
            return relative_memory_attention(
                qc, qp, k, v, r, key_valid=key_valid, scale=self.scale,
                dropout_p=self.attn_dropout if self.training else 0.0,
                recompute=self.checkpoint,
            )
        assert table is not None and table_index is not None
        position_scores = learned_position_scores(q * self.scale, table, table_index)
        return memory_attention(
            q, k, v, bias=position_scores, key_valid=key_valid, scale=self.scale,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )

    def forward(
        self,
        x: Tensor,
        kv_prefix: KeyValue | KeyValueCache,
        key_valid: Tensor | None,
        *,
        r: Tensor | None = None,
        table: Tensor | None = None,
        table_index: Tensor | None = None,
    ) -> tuple[Tensor, KeyValue]:
        """
        Args:
            x: (B, T, E) normalised new tokens.
            kv_prefix: (B, H or 1, P, D) keys and values of the keys before them, or a
                :class:`KeyValueCache` of them (streaming), extended in place.
            key_valid: (B, K) bool, False for keys never to attend to; None if all are valid.
            r: (H, K', D) relative positions of the last K' keys, the keys before them get
                no position score: projected sinusoids (:meth:`project_positions`; short memory
                and segment) or the learned table while every key exists
                (:func:`learned_positions_as_relative`).
            table, table_index: learned positions of keys in rows with empty memory slots, see
                :func:`learned_position_scores`.

        Returns:
            The (B, T, E) output and the new tokens' own keys and values.
        """
        q = self._split(self.to_q(x), self.heads)  # (B, H, T, D)
        k_new, v_new = self.project_kv(x)
        k, v = with_prefix(kv_prefix, k_new, v_new)
        if self.checkpoint and torch.is_grad_enabled() and r is None:
            # the (B, H, T, K) scores and weights are most of a step's activations: recompute
            # them in the backward pass instead of keeping them (the relative-position op does
            # this itself, cheaper)
            out = checkpoint(self._attend, q, k, v, key_valid, r, table, table_index,
                             use_reentrant=False)
        else:
            out = self._attend(q, k, v, key_valid, r, table, table_index)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.dropout(self.to_out(out)), (k_new, v_new)


class MemoryXLBlock(nn.Module):
    """``x <- combine(attn(norm(x) | memory), x)``, then ``x <- combine(ff(norm(x)), x)``, where
    ``combine`` is an addition or a gating cell (``residual``)."""

    def __init__(self, cfg: MemoryXLConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.attn = MemoryXLAttention(cfg)
        self.ff_norm = nn.LayerNorm(cfg.dim)
        self.ff = FeedForward(cfg.dim, cfg.ff_mult, dropout=cfg.dropout, glu=cfg.ff_glu)
        gated = cfg.residual != "add"
        self.attn_gate = GatedResidual(cfg.dim, cfg.residual, cfg.mogrify) if gated else None
        self.ff_gate = GatedResidual(cfg.dim, cfg.residual, cfg.mogrify) if gated else None
        self.norm_memory = cfg.norm_memory

    def memory_kv(self, memories: tuple[Tensor, ...], batch_size: int) -> KeyValue:
        """Keys and values (B, H or 1, S + P, D) of ``[mem_kv; *memories]``, each memory
        (B, P_i, E) projected on its own: a memory that is a constant then needs no input
        gradient (in a concatenation with the learned rows it would get one, a matmul as
        large as the projection), and backward keeps the state's own tensors, not a
        concatenated copy of them (20 MiB less at mem_len 1024, batch 4, dim 256)."""
        learned = self.attn.mem_kv.expand(batch_size, -1, -1)
        parts = [self.attn.project_kv(learned)] + [self._project_memory(m) for m in memories]
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(pair, dim=2) for pair in zip(*parts))

    def _project_memory(self, memory: Tensor) -> KeyValue:
        """Keys and values of a memory, normalised by this layer's norm if ``norm_memory``. A
        constant memory goes through :func:`memtx.ops.norm.layer_norm_linear`, which keeps
        only the memory for backward; otherwise (a long memory with its graph), with
        ``checkpoint_attention`` the normalised memory is rebuilt in backward."""
        if not self.norm_memory:
            return self.attn.project_kv(memory)  # keeps only the memory
        if (self.attn.checkpoint and torch.is_grad_enabled()
                and not layer_norm_linear_fuses(memory, self.attn_norm, self.attn.to_kv)):
            return checkpoint(self.attn.project_kv, memory, self.attn_norm, use_reentrant=False)
        return self.attn.project_kv(memory, self.attn_norm)

    def forward(self, x: Tensor, kv_prefix: KeyValue | KeyValueCache, key_valid: Tensor | None,
                **positions: Tensor | None) -> tuple[Tensor, KeyValue]:
        """(B, T, E) -> (B, T, E) and the new keys and values (arguments as
        :meth:`MemoryXLAttention.forward`)."""
        branch, kv = self.attn(self.attn_norm(x), kv_prefix, key_valid, **positions)
        x = x + branch if self.attn_gate is None else self.attn_gate(branch, x)
        branch = self.ff(self.ff_norm(x))
        x = x + branch if self.ff_gate is None else self.ff_gate(branch, x)
        return x, kv


# =============================================================================================
# The long-memory writer
# =============================================================================================
def linear_attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """``softmax_D(q) (softmax_N(k)^T v)`` per head: queries normalised over features, keys over
    positions (the seed's linear attention). q (B, H, Nq, D), k and v (B, H, N, D), key_valid
    (B, N) bool or None; returns (B, H, Nq, D). The plain reference of
    :func:`summarize_keys` + :func:`linear_attention_with_summary`."""
    if key_valid is not None:
        k = k.masked_fill(~key_valid[:, None, :, None], float("-inf"))
    context = torch.matmul(k.softmax(dim=-2).transpose(-1, -2), v)  # (B, H, D, D)
    return torch.matmul(q.softmax(dim=-1), context)


KeySummary = tuple[Tensor, Tensor, Tensor]  # max (B, H, 1, D), sum e v^T (B, H, D, D), sum e (B, H, 1, D)


def summarize_keys(k: Tensor, v: Tensor, key_valid: Tensor | None = None) -> KeySummary:
    """What linear attention needs of keys and values that several rounds share: with
    ``e = exp(k - max)``, the per-feature max, ``e^T v`` and ``sum e`` over positions. The
    softmax over positions is then finished by :func:`linear_attention_with_summary` without
    keeping a (B, H, N, D) tensor per round."""
    if key_valid is not None:
        k = k.masked_fill(~key_valid[:, None, :, None], float("-inf"))
    # the max only keeps exp() in range; the result does not depend on it, so no gradient
    peak = k.detach().amax(dim=-2, keepdim=True)
    e = torch.exp(k - peak)  # (B, H, N, D)
    return peak, torch.matmul(e.transpose(-1, -2), v), e.sum(dim=-2, keepdim=True)


def merge_key_summaries(a: KeySummary, b: KeySummary) -> KeySummary:
    """The :class:`KeySummary` of the keys and values that ``a`` and ``b`` summarise together:
    both parts rescaled to the larger per-feature max (a log-sum-exp merge)."""
    peak = torch.maximum(a[0], b[0])
    scale_a, scale_b = torch.exp(a[0] - peak), torch.exp(b[0] - peak)  # (B, H, 1, D)
    weighted = a[1] * scale_a.transpose(-1, -2) + b[1] * scale_b.transpose(-1, -2)
    return peak, weighted, a[2] * scale_a + b[2] * scale_b


def linear_attention_with_summary(q: Tensor, k: Tensor, v: Tensor, summary: KeySummary) -> Tensor:
    """:func:`linear_attention` of q over the keys and values ``k``, ``v`` *and* those that
    ``summary`` summarises, all normalised together."""
    _, weighted, total = merge_key_summaries(summary, summarize_keys(k, v))
    context = weighted / total.transpose(-1, -2)  # (B, H, D, D): rows are key features
    return torch.matmul(q.softmax(dim=-1), context)


class LongMemoryWriter(nn.Module):
    """Writes the long memory from the segment's layer inputs and the old short memories."""

    def __init__(self, cfg: MemoryXLConfig) -> None:
        super().__init__()
        dim, num_layers = cfg.dim, len(cfg.memory_layer_indices())
        self.heads, self.head_dim = cfg.write_heads, dim // cfg.write_heads
        self.iters = cfg.mem_write_iters
        self.scramble_heads = cfg.scramble_writer_heads
        # one scalar per memory layer, as the seed: tells the writer which depth a state is from
        self.depth_emb = _uniform_parameter(num_layers, dim=dim)
        self.init_lmem = _uniform_parameter(dim, dim=dim)  # every slot starts here...
        self.slot_emb = _uniform_parameter(cfg.lmem_len, dim, dim=dim)  # ...and differs by this
        self.mem_kv = _uniform_parameter(cfg.num_mem_kv, dim, dim=dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.gate = NBRC(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:
        batch, _, length, _ = x.shape
        if self.scramble_heads:  # the seed's layout: (B, H, D, N) memory read as (B, N, E)
            return x.transpose(2, 3).reshape(batch, length, -1)
        return x.transpose(1, 2).reshape(batch, length, -1)

    def context_summary(self, state: MemoryXLState, hiddens: Tensor) -> KeySummary:
        """The :func:`summarize_keys` summary of the writer's context: per memory layer l its
        short memory and segment inputs ``hiddens[l]`` (L, B, T, E), each plus that layer's
        depth embedding, then the S learned ``mem_kv`` rows; empty short-memory positions
        are left out.

        One memory layer at a time, merged with :func:`merge_key_summaries`: the writer runs
        at the end of the forward pass, while the step's activations are all held, and with
        the whole context projected at once its keys, values and exponentials raised the
        peak of a training step by 67 MiB (518 against 452 MiB at mem_len 1024, batch 4,
        dim 256); a layer at a time they add nothing measurable.

        The stored states are constants and the depth embedding is one scalar per layer added
        to every feature, which adds ``depth * W.sum(1)`` to the projection ``W``: so the
        projection runs over the constants alone and autograd forms no gradient for them (a
        matmul as large as the projection, only to reach the L depth scalars)."""
        weight = self.to_kv.weight  # (2E, E)
        dim = weight.shape[1]
        row_sums = weight.sum(1)
        mask = None
        if not bool(state.valid.all()):  # empty short-memory positions, in every layer
            mask = torch.cat((state.valid, state.valid.new_ones(state.valid.shape[0],
                                                                hiddens.shape[2])), dim=1)
        summary = None
        for layer in range(hiddens.shape[0]):
            stored = torch.cat((state.mem[layer], hiddens[layer]), dim=1)  # (B, M + T, E)
            kv = torch.addmm(self.depth_emb[layer] * row_sums, stored.flatten(0, 1), weight.t())
            kv = kv.view(*stored.shape[:2], 2 * dim)
            part = summarize_keys(self._split(kv[..., :dim]), self._split(kv[..., dim:]), mask)
            summary = part if summary is None else merge_key_summaries(summary, part)
        if self.mem_kv.shape[0]:
            kv_mem = self.to_kv(self.mem_kv).expand(hiddens.shape[1], -1, -1)  # (B, S, 2E)
            part = summarize_keys(self._split(kv_mem[..., :dim]), self._split(kv_mem[..., dim:]))
            summary = part if summary is None else merge_key_summaries(summary, part)
        assert summary is not None  # a writer exists only with memory layers
        return summary

    def forward(self, state: MemoryXLState, hiddens: Tensor) -> Tensor:
        """The next long memory (B, N, E) from ``state`` and the memory layers' inputs
        ``hiddens`` (L, B, T, E), which must already be detached."""
        lmem = torch.where(state.lmem_valid[:, None, None], state.lmem, self.init_lmem)
        lmem = lmem + self.slot_emb
        # the context does not change between rounds: project and summarise it once
        summary = self.context_summary(state, hiddens)
        for _ in range(self.iters):
            normed = self.norm(lmem)
            q = self._split(self.to_q(normed))
            k_slots, v_slots = (self._split(t) for t in self.to_kv(normed).chunk(2, dim=-1))
            out = linear_attention_with_summary(q, k_slots, v_slots, summary)
            lmem = self.gate(self.to_out(self._merge(out)), lmem)
        return lmem


# =============================================================================================
# The model
# =============================================================================================
@register("memory_xl")
class MemoryXL(MemoryLM):
    """Memory Transformer-XL language model under the memtx contract (see module docstring)."""

    config_class = MemoryXLConfig
    state_class = MemoryXLState
    writes_state_with_parameters = True  # the long-memory writer

    def __init__(self, config: MemoryXLConfig) -> None:
        super().__init__(config)
        cfg = config
        self.memory_layers = cfg.memory_layer_indices()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(MemoryXLBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim) if cfg.final_norm else nn.Identity()
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)
        self.table_len = cfg.seq_len + cfg.mem_len + cfg.lmem_len
        if cfg.positions == "learned":  # shared by every layer, zero at the start as the seed's
            self.pos_table = nn.Parameter(torch.zeros(cfg.heads, self.table_len, cfg.dim // cfg.heads))
        self.writer = LongMemoryWriter(cfg) if self.memory_layers else None
        self.apply(init_gpt2_weights)
        scale_residual_projections(self.blocks, cfg.depth)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    # -- state ---------------------------------------------------------------------------------
    def init_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> MemoryXLState:
        cfg = self.config
        device = self.device if device is None else device
        dtype = dtype or self.dtype
        num_layers = len(self.memory_layers)
        lmem_len = cfg.lmem_len if num_layers else 0
        return MemoryXLState(
            mem=torch.zeros(num_layers, batch_size, 0, cfg.dim, device=device, dtype=dtype),
            valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            lmem=torch.zeros(batch_size, lmem_len, cfg.dim, device=device, dtype=dtype),
            lmem_valid=torch.zeros(batch_size, dtype=torch.bool, device=device),
        )

    def state_limits(self) -> dict[str, int]:
        return {"mem": self.config.mem_len}

    def check_state(self, state: State, batch_size: int, device: torch.device) -> None:
        """The generic checks, preceded by ones that name the memory with the wrong shape."""
        if isinstance(state, MemoryXLState):
            cfg = self.config
            num_layers, lmem_len = len(self.memory_layers), (cfg.lmem_len if self.memory_layers else 0)
            mem, lmem = state.mem, state.lmem
            if mem.dim() != 4 or mem.shape[0] != num_layers or mem.shape[-1] != cfg.dim \
                    or mem.shape[2] > cfg.mem_len:
                raise StateError(
                    f"state.mem (the short memory) has shape {tuple(mem.shape)} but this model "
                    f"keeps (memory layers={num_layers}, batch, <= mem_len={cfg.mem_len}, "
                    f"dim={cfg.dim}); was it built for a model with another config?"
                )
            if lmem.dim() != 3 or lmem.shape[1:] != (lmem_len, cfg.dim):
                raise StateError(
                    f"state.lmem (the long memory) has shape {tuple(lmem.shape)} but this model "
                    f"keeps (batch, lmem_len={lmem_len}, dim={cfg.dim}); was it built for a "
                    "model with another config?"
                )
        super().check_state(state, batch_size, device)

    def write_memory(self, state: MemoryXLState, hiddens: Tensor) -> MemoryXLState:
        """The state after a full segment whose memory layers' inputs are ``hiddens``
        (L, B, T, E): the long memory rewritten, the short memory advanced (stop-gradient)."""
        if self.writer is None:
            return state
        hiddens = hiddens.detach().to(state.mem.dtype)
        lmem = self.writer(state, hiddens)
        mem, valid = append_to_fifo(state.mem, state.valid, hiddens, self.config.mem_len)
        return MemoryXLState(mem=mem, valid=valid, lmem=lmem,
                             lmem_valid=state.lmem_valid.new_ones(hiddens.shape[1]))

    # -- reading the memory --------------------------------------------------------------------
    def memory_prefixes(self, state: MemoryXLState) -> list[KeyValue]:
        """Per layer, keys and values of ``[mem_kv; long memory; short memory]`` (memory
        layers) or ``[mem_kv]`` (the others)."""
        batch = state.lmem.shape[0]
        prefixes = []
        for i, block in enumerate(self.blocks):
            if i in self.memory_layers:
                memories = (state.lmem, state.mem[self.memory_layers.index(i)])
                prefixes.append(block.memory_kv(memories, batch))
            else:
                prefixes.append(block.memory_kv((), batch))
        return prefixes

    def prefix_validity(self, state: MemoryXLState) -> Tensor | None:
        """(B, S + N + M) validity of a memory layer's prefix keys; None when all are valid."""
        if bool(state.valid.all()) and bool(state.lmem_valid.all()):
            return None
        batch, lmem_len = state.lmem.shape[:2]
        return torch.cat((
            state.valid.new_ones(batch, self.config.num_mem_kv),
            state.lmem_valid[:, None].expand(-1, lmem_len),
            state.valid,
        ), dim=1)

    def _slot_offset(self, stored: Tensor) -> Tensor:
        """The slot offset F of :meth:`_key_slots` for rows holding ``stored`` short-memory
        positions: ``min(M + dim, mem_len + lmem_len)``, the seed's."""
        cfg = self.config
        return (stored + cfg.dim).clamp(max=cfg.mem_len + cfg.lmem_len)

    def _key_slots(self, state: MemoryXLState, num_segment_keys: int) -> tuple[Tensor, Tensor]:
        """Slots (see :func:`learned_table_index`) of a memory layer's keys and of another
        layer's keys, each (B, K).

        Segment key j has slot ``F + j`` and a key before the segment has slot ``F - c``, c the
        number of existing keys from it to the segment. The seed takes the offset F from the
        memory tensors' last dimension (the model width) where it means the long memory's
        length, so ``F = min(mem_len + lmem_len, M + dim)`` for M stored short-memory
        positions; kept for parity. Keys with a negative slot fall off the table: no score.
        """
        cfg = self.config
        batch, lmem_len = state.lmem.shape[:2]
        device = state.valid.device
        stored = state.valid.sum(dim=1)  # (B,)
        offset = self._slot_offset(stored)  # F, (B,)
        segment_slots = offset[:, None] + torch.arange(num_segment_keys, device=device)
        exists = torch.cat((
            state.valid.new_ones(batch, cfg.num_mem_kv),
            state.lmem_valid[:, None].expand(-1, lmem_len),
            state.valid,
        ), dim=1)  # (B, S + N + M)
        to_segment = exists.flip(1).long().cumsum(dim=1).flip(1)  # existing keys from j on
        prefix_slots = offset[:, None] - to_segment
        prefix_slots = prefix_slots.masked_fill(~exists | (prefix_slots < 0), NO_POSITION)
        memory_layer = torch.cat((prefix_slots, segment_slots), dim=1)
        kv_slots = offset[:, None] - torch.arange(cfg.num_mem_kv, 0, -1, device=device)
        kv_slots = kv_slots.masked_fill(kv_slots < 0, NO_POSITION)
        other_layer = torch.cat((kv_slots, segment_slots), dim=1)
        return memory_layer, other_layer

    def run_blocks(
        self,
        x: Tensor,
        kv_prefixes: list[KeyValue] | list[KeyValueCache],
        state: MemoryXLState,
        first_query: int,
        projected_positions: list[Tensor] | None = None,
    ) -> tuple[Tensor, list[KeyValue], list[Tensor]]:
        """Run every block over the new tokens ``x`` (B, T, E), which sit at positions
        ``first_query ..`` of the segment; the prefixes hold the memory and the segment's
        earlier tokens. Returns the output, each layer's new keys and values and the memory
        layers' inputs. ``projected_positions`` caches each layer's projected sinusoids for at
        least as many distances as needed (streaming)."""
        cfg = self.config
        batch, length, _ = x.shape
        num_segment_keys = first_query + length
        short_len = state.mem.shape[2]
        prefix_valid = self.prefix_validity(state)
        memory_valid = None if prefix_valid is None else torch.cat(
            (prefix_valid, prefix_valid.new_ones(batch, num_segment_keys)), dim=1
        )
        if cfg.positions == "sinusoid":
            sinusoids = None
            if projected_positions is None:
                distances = relative_distances(short_len + num_segment_keys, x.device)
                sinusoids = sinusoid(distances, cfg.dim).to(x.dtype)
        elif prefix_valid is None:  # every key exists: the table is a relative shift
            offset = int(self._slot_offset(torch.tensor(short_len)))  # the same in every row
            memory_prefix = cfg.num_mem_kv + state.lmem.shape[1] + short_len
            memory_r, other_r = (
                learned_positions_as_relative(self.pos_table, cfg.seq_len, offset, prefix,
                                              prefix + num_segment_keys)
                for prefix in (memory_prefix, cfg.num_mem_kv)
            )
        else:
            memory_slots, other_slots = self._key_slots(state, num_segment_keys)
            memory_index, other_index = (
                learned_table_index(s, first_query, length, cfg.seq_len, self.table_len)
                for s in (memory_slots, other_slots)
            )
        new_kvs, hiddens = [], []
        for i, block in enumerate(self.blocks):
            is_memory_layer = i in self.memory_layers
            if is_memory_layer:
                hiddens.append(x)
            num_positioned = num_segment_keys + (short_len if is_memory_layer else 0)
            if cfg.positions == "sinusoid":
                if projected_positions is None:
                    r = block.attn.project_positions(self.dropout(sinusoids[-num_positioned:]))
                else:
                    r = projected_positions[i][:, -num_positioned:]
                positions: dict[str, Tensor | None] = {"r": r}
            elif prefix_valid is None:
                positions = {"r": memory_r if is_memory_layer else other_r}
            else:
                positions = {"table": self.pos_table,
                             "table_index": memory_index if is_memory_layer else other_index}
            x, kv = block(x, kv_prefixes[i], memory_valid if is_memory_layer else None, **positions)
            new_kvs.append(kv)
        return x, new_kvs, hiddens

    def forward_segment(self, input_ids: Tensor, state: MemoryXLState) -> tuple[Tensor, MemoryXLState, Tensor]:
        x = self.dropout(self.embed(input_ids))
        x, _, hiddens = self.run_blocks(x, self.memory_prefixes(state), state, first_query=0)
        logits = self.head(self.norm(x))
        # only a full segment writes, so that writes stay aligned to segment boundaries
        if input_ids.shape[1] == self.config.seq_len and hiddens:
            with self.state_update():
                state = self.write_memory(state, torch.stack(hiddens))
        aux_loss = torch.zeros((), device=x.device, dtype=torch.float32)
        return logits, state, aux_loss

    def stream(self, state: MemoryXLState | None = None, batch_size: int = 1) -> "MemoryXLStream":
        return MemoryXLStream(self, state, batch_size)


class MemoryXLStream(Stream):
    """Streaming decoder with a key/value cache of ``[mem_kv; memory; partial segment]`` per
    layer. Per-token cost is bounded by the memory and segment lengths; at a segment boundary
    the segment's memory-layer inputs are written with :meth:`MemoryXL.write_memory`, exactly
    as a training forward pass does."""

    model: MemoryXL

    def __init__(self, model: MemoryXL, state: MemoryXLState | None, batch_size: int) -> None:
        super().__init__(model, state, batch_size)
        cfg = model.config
        self._positions: list[Tensor] | None = None
        if cfg.positions == "sinusoid":
            max_keys = cfg.mem_len + cfg.seq_len
            sinusoids = sinusoid(relative_distances(max_keys, model.device), cfg.dim).to(model.dtype)
            self._positions = [block.attn.project_positions(sinusoids) for block in model.blocks]
        self._start_segment()

    def _start_segment(self) -> None:
        seq_len = self.model.config.seq_len
        self._kv = [KeyValueCache(prefix[0].shape[-2] + seq_len, prefix)
                    for prefix in self.model.memory_prefixes(self.state)]
        self._layer_inputs: list[list[Tensor]] = [[] for _ in self.model.memory_layers]

    def _commit(self) -> None:
        if self.model.memory_layers:
            hiddens = torch.stack([torch.cat(chunks, dim=1) for chunks in self._layer_inputs])
            self.state = self.model.write_memory(self.state, hiddens)
        self._start_segment()

    def _advance(self, input_ids: Tensor) -> Tensor:
        model = self.model
        x = model.embed(input_ids)
        # the attention layers append the new keys and values to the caches
        x, _, hiddens = model.run_blocks(x, self._kv, self.state, self.partial_len, self._positions)
        for chunks, h in zip(self._layer_inputs, hiddens):
            chunks.append(h)
        return model.head(model.norm(x))


# =============================================================================================
# Converting reference models (memory-transformer-xl==0.1.0)
# =============================================================================================
@register_converter("memory_transformer_xl.memory_transformer_xl.MemoryTransformerXL")
def from_memory_transformer_xl(reference: nn.Module) -> MemoryXL:
    """The memtx model equivalent to a ``memory_transformer_xl.MemoryTransformerXL``, weights
    copied. Its config is :meth:`MemoryXLConfig.like_seed` with the reference's sizes. The
    reference only writes memory when a segment is at least its ``mem_len`` long; memtx writes
    after every full segment, so the two agree when ``mem_len <= seq_len``."""
    ref: Any = reference
    if not isinstance(ref.to_model_dim, nn.Identity):
        raise InputError("memtx cannot convert a reference with emb_dim != dim")
    first_attn, first_ff = ref.attn_layers[0], ref.ff_layers[0]
    gated = hasattr(first_attn, "gru")
    attn = first_attn.fn.fn
    writer = ref.memory_network
    dim = ref.token_emb.embedding_dim
    heads = ref.pos_emb.shape[0]
    attn_layer_dropout, ff_dropout = attn.dropout.p, first_ff.fn.fn.dropout.p
    if attn_layer_dropout != ff_dropout:
        raise InputError(
            f"memtx has one dropout; the reference has attn_layer_dropout={attn_layer_dropout} "
            f"and ff_dropout={ff_dropout}"
        )
    cfg = MemoryXLConfig.like_seed(
        vocab_size=ref.token_emb.num_embeddings, dim=dim, depth=ref.depth, heads=heads,
        seq_len=ref.seq_len, mem_len=writer.mem_len, lmem_len=writer.lmem_len,
        memory_layers=tuple(ref.memory_layers), mem_write_iters=writer.mem_write_iters,
        write_heads=dim // writer.dim_head, num_mem_kv=attn.mem_kv.shape[1],
        residual="nbrc" if gated else "add",
        mogrify=gated and first_attn.mogrify is not None,
        ff_mult=first_ff.fn.fn.w2.in_features // dim, ff_glu=first_ff.fn.fn.glu,
        one_kv_head=attn.to_kv.out_features == 2 * (dim // heads),
        dropout=ff_dropout, attn_dropout=attn.attn_dropout.p,
    )
    model = MemoryXL(cfg)
    weights: dict[str, Tensor] = {
        "embed.weight": ref.token_emb.weight,
        "head.weight": ref.to_logits[-1].weight,
        "head.bias": ref.to_logits[-1].bias,
        "pos_table": ref.pos_emb,
    }
    for i, (attn_wrap, ff_wrap) in enumerate(zip(ref.attn_layers, ref.ff_layers)):
        for name, wrap in (("attn", attn_wrap), ("ff", ff_wrap)):
            prenorm = wrap.fn
            for key, value in prenorm.norm.state_dict().items():
                weights[f"blocks.{i}.{name}_norm.{key}"] = value
            for key, value in prenorm.fn.state_dict().items():
                weights[f"blocks.{i}.{name}.{key}"] = value[0] if key == "mem_kv" else value
            if gated:
                for key, value in wrap.gru.state_dict().items():
                    weights[f"blocks.{i}.{name}_gate.cell.{key}"] = value
                if wrap.mogrify is not None:
                    for part in ("Q", "R"):  # theirs: Sequential(factorised linear, Sigmoid)
                        sub = getattr(wrap.mogrify, part)[0]
                        for key, value in sub.state_dict().items():
                            weights[f"blocks.{i}.{name}_gate.mogrifier.{part}.{key}"] = value
    weights.update({
        "writer.depth_emb": writer.depth_emb.reshape(-1),
        "writer.init_lmem": writer.init_lmem.reshape(-1),
        "writer.slot_emb": writer.lmem_pos_emb[0],
        "writer.mem_kv": writer.mem_kv[0],
        # the seed multiplies x @ W; nn.Linear stores W transposed
        "writer.to_q.weight": writer.attn.to_q.t(),
        "writer.to_kv.weight": writer.attn.to_kv.t(),
        "writer.to_out.weight": writer.attn.to_out.t(),
    })
    for key, value in writer.gate.state_dict().items():
        weights[f"writer.gate.{key}"] = value
    model.load_state_dict({k: v.detach().clone() for k, v in weights.items()}, strict=True)
    return model.to(ref.token_emb.weight.device)
