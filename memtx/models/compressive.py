"""Compressive Transformer (Rae et al. 2019): a FIFO memory whose evicted entries are compressed.

Each memory layer keeps the last ``mem_len`` hidden states it attends to (a Transformer-XL
memory). When a segment pushes ``n`` entries out of that FIFO, the evicted entries are compressed
by ``compress_ratio`` into ``ceil(n / compress_ratio)`` compressed memories, appended to a second
FIFO of ``cmem_len`` entries. Queries of the segment attend causally over
``[compressed memory; memory; segment]`` with relative positions (the compressed memories count
as one position each, just before the memory, as in the paper). Layers not listed in
``memory_layers`` attend only to the segment.

What a memory holds: each memory layer stores the *normalised* inputs of a layer (the exact input
of its key/value projection), so memories are never re-normalised, and compression and the
reconstruction loss work on the vectors attention actually reads. With
``enhanced_recurrence=True`` (ERNIE-Doc's recurrence) memory layer ``l`` reads the previous
segments' normalised inputs of layer ``l + 1``, i.e. its own *output*, one level up; the top layer
has no layer above it and reads its own past inputs exactly as without enhanced recurrence. (The
reference's ``torch.roll`` over layers hands the top layer the *bottom* layer's memory instead.)

Compression functions (``compression``), from the paper: ``"conv"`` (1D convolution, kernel and
stride ``compress_ratio``), ``"mean"`` and ``"max"`` pooling, ``"dilated_conv"`` (a stack of
kernel-2 causal convolutions with dilations 1, 2, ..., ratio/2 read at the last position of
every group, WaveNet-style), and ``"most_used"`` (keep the ``n / ratio`` evicted memories that
received the most attention during the segment that evicts them, in their original order).
When ``n`` is not a multiple of the ratio, the oldest group is completed on the left with empty
(invalid) slots: pooling ignores them, convolutions see zeros, and a compressed slot is valid iff
one of its sources is.

Attention-reconstruction loss (paper, section 3.2): for each memory layer, content-based
attention of the segment's queries over the compressed memories should reproduce the same
attention over exactly the memories they replace. The queries, the evicted memories, their keys
and values, and the key/value projection *weights* are all stop-gradients (the weights are
detached functionally, never in place), so this loss trains the compression network only; the
compressed memory is stored detached, so the language-model loss never reaches the compression
network. The loss (MSE, averaged over memory layers, times ``reconstruction_loss_weight``) is
computed in training mode for the compression functions that have parameters (``conv``,
``dilated_conv``) and returned in ``aux_loss``; otherwise ``aux_loss`` is 0.

Defaults, chosen by measurement (``benchmarks/compressive.py quality``): pre-norm residuals, a
final LayerNorm and Transformer-XL's sinusoidal relative positions with learned biases (``u``,
``v``) and per-layer projections. The reference's skeleton (GRU-gated residuals, a
zero-initialised learned relative-position table shared by all layers, no final norm) trains
worse at equal budget: on tinyshakespeare (dim 128, depth 4, 4 minutes each, alternating) it
reached 5.49 validation bpc against 3.97 for these defaults (it is also slower per step: 24
steps against 40); at equal tokens (dim 64, depth 4, 150 steps of 16 x 64) 4.85 against 3.40,
in line with DESIGN.md (a plateau near 3.55 bpc where pre-norm XL reaches
2.56). It stays available (``gru_gated_residual=True, positions="learned", final_norm=False``)
and reproduces the reference package's numbers with its weights
(:func:`from_reference_state_dict`).

Shape legend: B batch, T segment, M memory, C compressed memory, N evicted memories,
K = C + M + T keys, L layers (L_mem memory layers), H heads, D head dim, E model width,
V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memtx.config import ModelConfig
from memtx.layers.init import init_gpt2_weights, scale_residual_projections
from memtx.errors import InputError
from memtx.generation import Stream
from memtx.layers.attention import KeyValue, KeyValueCache, project_positions, with_prefix
from memtx.layers.feedforward import FeedForward
from memtx.layers.gating import GatedResidual
from memtx.modeling import MemoryLM
from memtx.ops.attention import causal_mask, relative_memory_attention, softmax_in_place
from memtx.ops.position import relative_distances, relative_position_scores, sinusoid
from memtx.reference import register_converter
from memtx.registry import register
from memtx.state import State, memory_field

COMPRESSIONS = ("conv", "mean", "max", "dilated_conv", "most_used")
POSITIONS = ("sinusoid", "learned")



# ============================================================================================
# Config
# ============================================================================================
@dataclass(kw_only=True)
class CompressiveConfig(ModelConfig):
    """Compressive Transformer hyper-parameters (beyond :class:`memtx.config.ModelConfig`).

    Attributes:
        mem_len: memory entries per memory layer; at least ``seq_len`` so that a segment only
            ever evicts memories (never its own positions).
        cmem_len: compressed memory entries per memory layer; at least
            ``mem_len // compress_ratio``.
        compress_ratio: how many memories one compressed memory replaces (>= 2; a power of two
            for ``dilated_conv``).
        compression: ``"conv"``, ``"mean"``, ``"max"``, ``"dilated_conv"`` or ``"most_used"``
            (see the module docstring).
        memory_layers: 1-based numbers of the layers that have a memory (default: all).
        enhanced_recurrence: memory layers read the previous segments' states of the layer
            above (the top layer reads its own); see the module docstring.
        positions: ``"sinusoid"`` (Transformer-XL: sinusoids of distances, projected per layer,
            with learned content and position biases) or ``"learned"`` (the reference's
            zero-initialised table of per-head embeddings shared by all layers).
        gru_gated_residual: GRU-gated residuals ``gru(f(norm x), x)`` instead of ``x + f(norm x)``.
        mogrify_gru: mix branch and residual with a Mogrifier before the GRU (needs
            ``gru_gated_residual``).
        final_norm: LayerNorm before the output head.
        ff_mult: feed-forward hidden width as a multiple of ``dim``.
        ff_glu: gated (GEGLU) feed-forward.
        attn_dropout: dropout on attention weights.
        attn_layer_dropout: dropout on the attention block's output.
        ff_dropout: dropout on the feed-forward hidden activations.
        reconstruction_loss_weight: weight of the attention-reconstruction loss in ``aux_loss``
            (0 turns it off).
        reconstruction_attn_dropout: dropout on the attention weights of both sides of the
            reconstruction loss (independent masks, as in the reference).
        checkpoint_attention: rebuild each layer's (B, H, T, C + M + T) attention weights in
            the backward pass instead of keeping them (same results; less memory with long
            memories, for one more score computation per layer in backward).
    """

    mem_len: int = 256
    cmem_len: int = 64
    compress_ratio: int = 4
    compression: str = "conv"
    memory_layers: tuple[int, ...] | None = None
    enhanced_recurrence: bool = False
    positions: str = "sinusoid"
    gru_gated_residual: bool = False
    mogrify_gru: bool = False
    final_norm: bool = True
    ff_mult: int = 4
    ff_glu: bool = False
    attn_dropout: float = 0.0
    attn_layer_dropout: float = 0.0
    ff_dropout: float = 0.0
    reconstruction_loss_weight: float = 1.0
    reconstruction_attn_dropout: float = 0.0
    checkpoint_attention: bool = False

    def validate(self) -> None:
        super().validate()
        self.require(self.dim % self.heads == 0, "dim", f"must be divisible by heads={self.heads}")
        self.require(
            self.mem_len >= self.seq_len, "mem_len",
            f"must be >= seq_len={self.seq_len} (a segment may only evict memories)",
        )
        self.require(self.compress_ratio >= 2, "compress_ratio", "must be at least 2")
        self.require(
            self.cmem_len >= max(1, self.mem_len // self.compress_ratio), "cmem_len",
            f"must be >= mem_len // compress_ratio = {self.mem_len // self.compress_ratio} "
            "(and at least 1)",
        )
        self.require(
            self.compression in COMPRESSIONS, "compression",
            f"is not a compression function; use one of {', '.join(COMPRESSIONS)}",
        )
        if self.compression == "dilated_conv":
            ratio = self.compress_ratio
            self.require(
                ratio & (ratio - 1) == 0, "compress_ratio",
                "must be a power of two for compression='dilated_conv'",
            )
        if self.memory_layers is not None:
            layers = self.memory_layers
            self.require(len(layers) >= 1, "memory_layers", "must name at least one layer (or None for all)")
            self.require(
                all(1 <= layer <= self.depth for layer in layers), "memory_layers",
                f"must hold layer numbers in [1, depth={self.depth}]",
            )
            self.require(len(set(layers)) == len(layers), "memory_layers", "must not repeat a layer")
        self.require(
            self.positions in POSITIONS, "positions", f"must be one of {', '.join(POSITIONS)}"
        )
        if self.positions == "sinusoid":
            self.require(self.dim % 2 == 0, "dim", "must be even (sinusoidal positions)")
        self.require(
            not self.mogrify_gru or self.gru_gated_residual, "mogrify_gru",
            "needs gru_gated_residual=True",
        )
        if self.mogrify_gru:
            self.require(self.dim >= 8, "dim", "must be at least 8 for the Mogrifier (rank dim // 4)")
        self.require(self.ff_mult >= 1, "ff_mult", "must be at least 1")
        self.require_probabilities(
            "attn_dropout", "attn_layer_dropout", "ff_dropout", "reconstruction_attn_dropout"
        )
        self.require(self.reconstruction_loss_weight >= 0, "reconstruction_loss_weight", "must be >= 0")

    def memory_layer_indices(self) -> list[int]:
        """0-based indices of the memory layers, bottom to top."""
        layers = range(1, self.depth + 1) if self.memory_layers is None else self.memory_layers
        return sorted(layer - 1 for layer in layers)


# ============================================================================================
# State
# ============================================================================================
@dataclass(frozen=True)
class CompressiveMemory(State):
    """Memory and compressed memory of every memory layer, oldest first.

    ``valid``/``cmem_valid`` are False for entries that do not exist (a row cleared by
    :meth:`reset`, or the empty slots completing a group before compression); invalid entries
    are always the oldest ones (left padding) and attention never looks at them.
    """

    mem: Tensor = memory_field("layer", "batch", "mem", "dim")  # (L_mem, B, M, E)
    valid: Tensor = memory_field("batch", "mem", fill=False)  # (B, M) bool
    cmem: Tensor = memory_field("layer", "batch", "cmem", "dim")  # (L_mem, B, C, E)
    cmem_valid: Tensor = memory_field("batch", "cmem", fill=False)  # (B, C) bool


# ============================================================================================
# Compression functions: (B, N, E) memories with N a multiple of the ratio -> (B, N/ratio, E)
# ============================================================================================
class ConvCompression(nn.Module):
    """1D convolution with kernel and stride ``ratio`` (the paper's and the seed's default)."""

    has_parameters = True

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, ratio, stride=ratio)
        # start as mean pooling, so compressed memories are useful before the loss shapes them
        # (the reconstruction loss's gradient differs per channel: no noise needed to break ties)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(dim)[:, :, None].expand(dim, dim, ratio) / ratio)
            self.conv.bias.zero_()

    def forward(self, mem: Tensor, valid: Tensor, usage: Tensor | None = None) -> Tensor:
        mem = mem * valid[..., None]  # empty slots read as zeros
        return self.conv(mem.transpose(1, 2)).transpose(1, 2)


class DilatedConvCompression(nn.Module):
    """Kernel-2 causal convolutions with dilations 1, 2, ..., ratio/2 (a WaveNet stack whose
    receptive field is one group of ``ratio`` memories), read at the last position of each group.
    At those positions the stack is exactly a tree of kernel-2, stride-2 convolutions, which is
    how it is computed (no wasted outputs). Linear, like the paper's 1D convolution."""

    has_parameters = True

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        levels = ratio.bit_length() - 1
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, 2, stride=2) for _ in range(levels))
        with torch.no_grad():  # start as mean pooling, as ConvCompression
            for conv in self.convs:
                conv.weight.copy_(torch.eye(dim)[:, :, None].expand(dim, dim, 2) / 2)
                conv.bias.zero_()

    def forward(self, mem: Tensor, valid: Tensor, usage: Tensor | None = None) -> Tensor:
        h = (mem * valid[..., None]).transpose(1, 2)  # (B, E, N)
        for conv in self.convs:
            h = conv(h)
        return h.transpose(1, 2)


class PoolCompression(nn.Module):
    """Mean or max over each group of ``ratio`` memories, ignoring empty slots (a group with
    no valid memory gives zeros)."""

    has_parameters = False

    def __init__(self, ratio: int, mode: str) -> None:
        super().__init__()
        self.ratio, self.mode = ratio, mode

    def forward(self, mem: Tensor, valid: Tensor, usage: Tensor | None = None) -> Tensor:
        batch, length, dim = mem.shape
        groups = mem.view(batch, length // self.ratio, self.ratio, dim)
        keep = valid.view(batch, length // self.ratio, self.ratio, 1)
        if self.mode == "mean":
            return (groups * keep).sum(2) / keep.sum(2).clamp(min=1)
        out = groups.masked_fill(~keep, float("-inf")).amax(2)
        return out.masked_fill(~keep.any(2), 0.0)


class MostUsedCompression(nn.Module):
    """Keep the ``N / ratio`` memories with the largest attention usage (attention weight
    received, summed over heads and queries of the segment that evicts them), in their order.
    Empty slots are never preferred to a valid memory."""

    has_parameters = False

    def __init__(self, ratio: int) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, mem: Tensor, valid: Tensor, usage: Tensor | None = None) -> Tensor:
        if usage is None:
            raise ValueError("most_used compression needs the attention usage of the memories")
        keep = mem.shape[1] // self.ratio
        score = usage.masked_fill(~valid, float("-inf"))
        index = score.topk(keep, dim=1).indices.sort(dim=1).values  # (B, N/ratio)
        picked = mem.gather(1, index[..., None].expand(-1, -1, mem.shape[2]))
        return picked * valid.gather(1, index)[..., None]


def build_compression(kind: str, dim: int, ratio: int) -> nn.Module:
    """The compression module named ``kind`` (one of :data:`COMPRESSIONS`)."""
    if kind == "conv":
        return ConvCompression(dim, ratio)
    if kind == "dilated_conv":
        return DilatedConvCompression(dim, ratio)
    if kind in ("mean", "max"):
        return PoolCompression(ratio, kind)
    if kind == "most_used":
        return MostUsedCompression(ratio)
    raise ValueError(f"unknown compression {kind!r}; use one of {', '.join(COMPRESSIONS)}")


def compressed_validity(valid: Tensor, ratio: int, kind: str) -> Tensor:
    """(B, N/ratio) validity of the compressed slots of (B, N) memories whose invalid entries
    are the oldest: a pooled group is valid iff one source is; ``most_used`` keeps every valid
    memory it can, so its last ``min(valid, N/ratio)`` slots are valid."""
    batch, length = valid.shape
    if kind != "most_used":
        return valid.view(batch, length // ratio, ratio).any(2)
    keep = length // ratio
    num_valid = valid.sum(1, keepdim=True).clamp(max=keep)
    return torch.arange(keep, device=valid.device) >= keep - num_valid


def attend_in_place(queries: Tensor, kv: KeyValue, valid: Tensor, scale: float,
                    dropout_p: float = 0.0) -> Tensor:
    """Without autograd, :func:`attention_reconstruction_loss`'s attention of ``queries`` over
    ``kv`` with every step on one (B, H, T, N) tensor."""
    scores = torch.matmul(queries, kv[0].transpose(-1, -2)).mul_(scale)
    scores.masked_fill_(~valid[:, None, None, :], torch.finfo(scores.dtype).min)
    weights = softmax_in_place(scores)
    if dropout_p:
        weights = F.dropout(weights, p=dropout_p, inplace=True)
    return torch.matmul(weights, kv[1])


def attention_reconstruction_loss(
    queries: Tensor,
    target_kv: KeyValue,
    target_valid: Tensor,
    compressed_kv: KeyValue,
    compressed_valid: Tensor,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """MSE between content attention over the replaced memories and over their compression.

    Args:
        queries: (B, H, T, D) content queries of the segment (stop-gradient).
        target_kv: keys and values (B, H, N, D) of exactly the evicted memories (stop-gradient).
        target_valid: (B, N) bool; rows with no valid evicted memory are left out of the mean.
        compressed_kv: keys and values (B, H, N/ratio, D) of the compressed memories.
        compressed_valid: (B, N/ratio) bool.
        scale: score scale.
        dropout_p: dropout on both sides' attention weights.
    """

    def attend(kv: KeyValue, valid: Tensor) -> Tensor:
        scores = torch.matmul(queries, kv[0].transpose(-1, -2)) * scale  # (B, H, T, N)
        # the finite minimum keeps rows without valid keys finite; they are weighted 0 below
        scores = scores.masked_fill(~valid[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = F.dropout(scores.softmax(-1), p=dropout_p) if dropout_p else scores.softmax(-1)
        return torch.matmul(weights, kv[1])

    reconstructed = attend(compressed_kv, compressed_valid)
    with torch.no_grad():  # the target has no gradient: one (B, H, T, N) tensor, in place
        target = attend_in_place(queries, target_kv, target_valid, scale, dropout_p)
    error = (reconstructed - target).pow(2)
    rows = target_valid.any(1).to(error.dtype)  # (B,)
    per_row = error.flatten(1).mean(1)
    return (per_row * rows).sum() / rows.sum().clamp(min=1)


# ============================================================================================
# Attention and block
# ============================================================================================
class AttentionOutput(NamedTuple):
    out: Tensor  # (B, T, E)
    kv: KeyValue  # keys and values of [prefix; segment] (B, H, K, D)
    query: Tensor  # (B, H, T, D) content queries (for the reconstruction loss)
    usage: Tensor | None  # (B, M) attention received by the memory, summed over heads/queries


class CompressiveAttention(nn.Module):
    """Causal multi-head attention over ``[prefix; segment]`` with relative positions.

    ``positions="sinusoid"``: scores ``(q + u).k + (q + v).r`` with ``r`` this layer's projection
    of sinusoids (Dai et al. 2019). ``positions="learned"``: ``q.k + q.r`` with ``r`` rows of the
    model's shared table (the reference). Prefix keys and values (compressed memory, memory and,
    when streaming, the segment so far) come in projected.
    """

    def __init__(self, cfg: CompressiveConfig) -> None:
        super().__init__()
        dim, heads = cfg.dim, cfg.heads
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.sinusoid = cfg.positions == "sinusoid"
        if self.sinusoid:
            self.to_r = nn.Linear(dim, dim, bias=False)
            self.content_bias = nn.Parameter(torch.zeros(heads, self.head_dim))  # u
            self.position_bias = nn.Parameter(torch.zeros(heads, self.head_dim))  # v
        self.attn_dropout = cfg.attn_dropout
        self.checkpoint_attention = cfg.checkpoint_attention
        self.dropout = nn.Dropout(cfg.attn_layer_dropout)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def project_kv(self, h: Tensor, detach_weights: bool = False) -> KeyValue:
        """Keys and values (B, H, N, D) of normalised states ``h`` (B, N, E). With
        ``detach_weights`` the projection is a constant to autograd (the parameter itself is
        left untouched)."""
        weight = self.to_kv.weight.detach() if detach_weights else self.to_kv.weight
        k, v = F.linear(h, weight).chunk(2, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    def project_positions(self, pos_emb: Tensor) -> Tensor:
        """(H, K, D) projections of sinusoids (K, E) (``positions="sinusoid"`` only)."""
        return project_positions(self.to_r, pos_emb, self.heads)

    def forward(
        self,
        h: Tensor,
        kv_prefix: KeyValue | KeyValueCache | None,
        r: Tensor,
        key_valid: Tensor | None,
        usage_columns: tuple[int, int] | None = None,
    ) -> AttentionOutput:
        """
        Args:
            h: (B, T, E) normalised segment states.
            kv_prefix: keys and values (B, H, P, D) of the keys before the segment, or None;
                or a :class:`KeyValueCache` of them (streaming), extended in place.
            r: (H, K, D) embeddings of distances K-1, ..., 0 for K = P + T keys.
            key_valid: optional (B, K) bool, False for empty memory slots.
            usage_columns: (start, stop) prefix columns whose attention usage to return.
        """
        q = self._split_heads(self.to_q(h))  # (B, H, T, D)
        k_new, v_new = self.project_kv(h)
        k, v = with_prefix(kv_prefix, k_new, v_new)
        if self.sinusoid:
            q_content = q + self.content_bias[:, None, :]
            q_position = q + self.position_bias[:, None, :]
        else:
            q_content = q_position = q
        out = relative_memory_attention(
            q_content, q_position, k, v, r, key_valid=key_valid, scale=self.scale,
            dropout_p=self.attn_dropout if self.training else 0.0,
            recompute=self.checkpoint_attention,
        )
        usage = None
        if usage_columns is not None:
            position_scores = relative_position_scores(q_position * self.scale, r)
            usage = attention_usage(q_content, k, position_scores, key_valid, self.scale)
            usage = usage[:, usage_columns[0] : usage_columns[1]]
        out = out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)
        return AttentionOutput(self.dropout(self.to_out(out)), (k, v), q_content, usage)


@torch.no_grad()
def attention_usage(
    q: Tensor, k: Tensor, bias: Tensor, key_valid: Tensor | None, scale: float
) -> Tensor:
    """(B, K) attention weight each key receives, summed over heads and queries (the usage that
    ``most_used`` compression ranks by). Recomputes the weights: the fused attention does not
    return them."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + bias  # (B, H, T, K)
    allowed = causal_mask(q.shape[-2], k.shape[-2], q.device)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1).sum(dim=(1, 2))


class BlockOutput(NamedTuple):
    x: Tensor  # (B, T, E) output
    h: Tensor  # (B, T, E) normalised input (what a memory stores)
    kv: KeyValue
    query: Tensor
    usage: Tensor | None


class CompressiveBlock(nn.Module):
    """Attention then feed-forward, each on the LayerNorm of the residual stream, merged by
    ``x + f(norm x)`` or a GRU gate ``gru(f(norm x), x)``; memory layers own a compressor."""

    def __init__(self, cfg: CompressiveConfig, has_memory: bool) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.dim)
        self.attn = CompressiveAttention(cfg)
        self.ff_norm = nn.LayerNorm(cfg.dim)
        self.ff = FeedForward(cfg.dim, cfg.ff_mult, dropout=cfg.ff_dropout, glu=cfg.ff_glu)
        self.attn_gate: GatedResidual | None = None
        self.ff_gate: GatedResidual | None = None
        if cfg.gru_gated_residual:
            self.attn_gate = GatedResidual(cfg.dim, "gru", mogrify=cfg.mogrify_gru)
            self.ff_gate = GatedResidual(cfg.dim, "gru", mogrify=cfg.mogrify_gru)
        self.compress = (
            build_compression(cfg.compression, cfg.dim, cfg.compress_ratio) if has_memory else None
        )

    def forward(
        self,
        x: Tensor,
        kv_prefix: KeyValue | KeyValueCache | None,
        r: Tensor,
        key_valid: Tensor | None,
        usage_columns: tuple[int, int] | None = None,
    ) -> BlockOutput:
        h = self.attn_norm(x)
        attn = self.attn(h, kv_prefix, r, key_valid, usage_columns)
        x = x + attn.out if self.attn_gate is None else self.attn_gate(attn.out, x)
        ff_out = self.ff(self.ff_norm(x))
        x = x + ff_out if self.ff_gate is None else self.ff_gate(ff_out, x)
        return BlockOutput(x, h, attn.kv, attn.query, attn.usage)


# ============================================================================================
# Model
# ============================================================================================
class Compression(NamedTuple):
    """What one commit evicted and compressed (for the reconstruction loss)."""

    num_evicted: int  # N, the evicted memories (before completing the oldest group)
    evicted_valid: Tensor  # (B, N)
    compressed: list[Tensor]  # per memory layer (B, ceil(N/ratio), E), with autograd history
    compressed_valid: Tensor  # (B, ceil(N/ratio))


@register("compressive")
class CompressiveTransformer(MemoryLM):
    """Compressive Transformer language model under the memtx contract (see module docstring)."""

    config_class = CompressiveConfig
    state_class = CompressiveMemory

    def __init__(self, config: CompressiveConfig) -> None:
        super().__init__(config)
        cfg = config
        self.memory_layers = cfg.memory_layer_indices()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(
            CompressiveBlock(cfg, has_memory=i in self.memory_layers) for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim) if cfg.final_norm else nn.Identity()
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)
        self.apply(init_gpt2_weights)
        scale_residual_projections(self.blocks, cfg.depth)
        if cfg.positions == "learned":
            # row ``base - 1 - d`` embeds distance d, base = C + M + seq_len (see positions())
            table = torch.zeros(cfg.heads, cfg.seq_len + cfg.mem_len + cfg.cmem_len, cfg.dim // cfg.heads)
            self.pos_table = nn.Parameter(table)

    # -- state ---------------------------------------------------------------------------------
    def init_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> CompressiveMemory:
        cfg = self.config
        device = self.device if device is None else device
        dtype = dtype or self.dtype
        layers = len(self.memory_layers)
        return CompressiveMemory(
            mem=torch.zeros(layers, batch_size, 0, cfg.dim, device=device, dtype=dtype),
            valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            cmem=torch.zeros(layers, batch_size, 0, cfg.dim, device=device, dtype=dtype),
            cmem_valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
        )

    def state_limits(self) -> dict[str, int]:
        return {"mem": self.config.mem_len, "cmem": self.config.cmem_len}

    def segments_to_fill(self) -> int:
        """The memory fills first; then each segment's evictions, compressed (a group of up to
        ``compress_ratio`` evicted positions per compressed entry, as :meth:`commit` does), add
        to the compressed memory until ``cmem_len``. Counted by following the sizes."""
        cfg = self.config
        mem = cmem = segments = 0
        while mem < cfg.mem_len or cmem < cfg.cmem_len:
            segments += 1
            evicted = max(mem + cfg.seq_len - cfg.mem_len, 0)
            mem += cfg.seq_len - evicted
            cmem = min(cfg.cmem_len, cmem + math.ceil(evicted / cfg.compress_ratio))
        return segments

    def written_states(self, hiddens: list[Tensor]) -> Tensor:
        """(L_mem, B, T, E) states each memory layer commits, from every layer's normalised
        input (B, T, E): its own, or with enhanced recurrence the layer above's (the top layer,
        with nothing above, keeps its own)."""
        top = self.config.depth - 1
        shift = 1 if self.config.enhanced_recurrence else 0
        return torch.stack([hiddens[min(layer + shift, top)] for layer in self.memory_layers])

    def commit(
        self, state: CompressiveMemory, written: Tensor, usage: Tensor | None = None
    ) -> tuple[CompressiveMemory, Compression | None]:
        """The memory after a segment whose memory layers wrote ``written`` (L_mem, B, T, E):
        the last ``mem_len`` entries of ``[memory; written]`` (a stop-gradient), with the evicted
        ones compressed onto the compressed memory (also a stop-gradient). ``usage``
        (L_mem, B, M) is the attention the current memory received (``most_used`` only).
        Training and streaming both commit through here."""
        cfg = self.config
        batch, length = written.shape[1], written.shape[2]
        ones = torch.ones(batch, length, dtype=torch.bool, device=state.valid.device)
        # the evicted memories are the oldest of the current memory (mem_len >= seq_len), so
        # the next memory is built from what stays, at its own size
        num_evicted = max(state.mem.shape[2] + length - cfg.mem_len, 0)
        evicted, evicted_valid = state.mem[:, :, :num_evicted], state.valid[:, :num_evicted]
        mem = torch.cat((state.mem[:, :, num_evicted:], written.detach().to(state.mem.dtype)),
                        dim=2)
        valid = torch.cat((state.valid[:, num_evicted:], ones), dim=1)
        if num_evicted == 0:
            return CompressiveMemory(mem, valid, state.cmem, state.cmem_valid), None
        # complete the oldest group on the left with empty slots: ratio - N % ratio of them
        # (the reference pads N % ratio, which drops memories)
        pad = -num_evicted % cfg.compress_ratio
        padded = F.pad(evicted, (0, 0, pad, 0)) if pad else evicted
        padded_valid = F.pad(evicted_valid, (pad, 0), value=False)
        compressed = []
        for j, layer in enumerate(self.memory_layers):
            layer_usage = None
            if usage is not None:  # evicted memories are the oldest of the current memory
                layer_usage = F.pad(usage[j, :, :num_evicted], (pad, 0))
            compress = self.blocks[layer].compress
            compressed.append(compress(padded[j], padded_valid, layer_usage))
        compressed_valid = compressed_validity(padded_valid, cfg.compress_ratio, cfg.compression)
        drop = max(state.cmem.shape[2] + compressed_valid.shape[1] - cfg.cmem_len, 0)
        cmem = torch.cat((state.cmem[:, :, drop:], torch.stack(compressed).detach()), dim=2)
        cmem_valid = torch.cat((state.cmem_valid[:, drop:], compressed_valid), dim=1)
        # (one commit can compress more than cmem_len when mem_len is not a multiple of ratio)
        cmem, cmem_valid = cmem[:, :, -cfg.cmem_len:], cmem_valid[:, -cfg.cmem_len:]
        new_state = CompressiveMemory(mem, valid, cmem, cmem_valid)
        return new_state, Compression(num_evicted, evicted_valid, compressed, compressed_valid)

    # -- forward -------------------------------------------------------------------------------
    def positions(self, base: int) -> list[Tensor]:
        """Per layer, (H, base, D) embeddings of the distances base-1, ..., 0; a layer with K
        keys uses the last K. With the learned table, ``base`` must be C + M + seq_len (C, M the
        current memory sizes): the reference slices its table that way, so while the memory is
        still filling a distance reads a row shifted by the missing memory."""
        if self.config.positions == "learned":
            return [self.pos_table[:, :base]] * self.config.depth
        pos_emb = sinusoid(relative_distances(base, self.device), self.config.dim).to(self.dtype)
        return [block.attn.project_positions(pos_emb) for block in self.blocks]

    def position_base(self, state: CompressiveMemory, length: int) -> int:
        """The ``base`` argument of :meth:`positions` for a segment of ``length`` tokens."""
        cached = state.mem.shape[2] + state.cmem.shape[2]
        return cached + (self.config.seq_len if self.config.positions == "learned" else length)

    def memory_prefix(self, state: CompressiveMemory, layer: int) -> KeyValue | None:
        """Keys and values (B, H, C + M, D) of ``[compressed memory; memory]`` of a memory layer."""
        if state.mem.shape[2] + state.cmem.shape[2] == 0:
            return None
        j = self.memory_layers.index(layer)
        stored = torch.cat((state.cmem[j], state.mem[j]), dim=1)
        return self.blocks[layer].attn.project_kv(stored)

    def forward_segment(
        self, input_ids: Tensor, state: CompressiveMemory
    ) -> tuple[Tensor, CompressiveMemory, Tensor]:
        batch, length = input_ids.shape
        num_cmem, num_mem = state.cmem.shape[2], state.mem.shape[2]
        x = self.embed(input_ids)
        positions = self.positions(self.position_base(state, length))
        key_valid = prefix_validity(state, length)
        # usage is only needed when this segment evicts memories
        most_used = self.config.compression == "most_used" and num_mem + length > self.config.mem_len
        # the reconstruction loss needs the keys and values of the memories this segment evicts
        num_evicted = max(num_mem + length - self.config.mem_len, 0)
        reconstructs = num_evicted > 0 and self.training and self.reconstructs()
        evicted = slice(num_cmem, num_cmem + num_evicted)  # their columns of the prefix
        hiddens, queries, targets, usages = [], {}, {}, []
        for layer, block in enumerate(self.blocks):
            if layer in self.memory_layers:
                prefix = self.memory_prefix(state, layer)
                if reconstructs:  # a copy: the whole prefix is not kept for it
                    targets[layer] = tuple(t[:, :, evicted].detach().clone(
                        memory_format=torch.contiguous_format) for t in prefix)
                num_keys, valid = num_cmem + num_mem + length, key_valid
                usage_columns = (num_cmem, num_cmem + num_mem) if most_used else None
            else:
                prefix, num_keys, valid, usage_columns = None, length, None, None
            out = block(x, prefix, positions[layer][:, -num_keys:], valid, usage_columns)
            x = out.x
            hiddens.append(out.h)
            queries[layer] = out.query
            if out.usage is not None:
                usages.append(out.usage)
        logits = self.head(self.norm(x))
        usage = torch.stack(usages) if usages else None
        next_state, compression = self.commit(state, self.written_states(hiddens), usage)
        aux_loss = torch.zeros((), device=x.device, dtype=torch.float32)
        if reconstructs:
            assert compression is not None and compression.num_evicted == num_evicted
            aux_loss = self.reconstruction_loss(queries, targets, compression)
        return logits, next_state, aux_loss

    def reconstructs(self) -> bool:
        """Whether this model has a reconstruction loss (a trainable compressor and weight > 0)."""
        block = self.blocks[self.memory_layers[0]]
        return block.compress.has_parameters and self.config.reconstruction_loss_weight > 0

    def reconstruction_loss(
        self,
        queries: dict[int, Tensor],
        targets: dict[int, KeyValue],
        compression: Compression,
    ) -> Tensor:
        """``reconstruction_loss_weight`` x the mean over memory layers of
        :func:`attention_reconstruction_loss` (see the module docstring); ``targets`` are the
        keys and values of the evicted memories, per memory layer."""
        cfg = self.config
        total = torch.zeros((), device=compression.evicted_valid.device)
        for j, layer in enumerate(self.memory_layers):
            attn = self.blocks[layer].attn
            total = total + attention_reconstruction_loss(
                queries[layer].detach(),
                targets[layer],
                compression.evicted_valid,
                attn.project_kv(compression.compressed[j], detach_weights=True),
                compression.compressed_valid,
                attn.scale,
                cfg.reconstruction_attn_dropout if self.training else 0.0,
            )
        return total * cfg.reconstruction_loss_weight / len(self.memory_layers)

    def stream(
        self, state: CompressiveMemory | None = None, batch_size: int = 1
    ) -> "CompressiveStream":
        return CompressiveStream(self, state, batch_size)


def prefix_validity(state: CompressiveMemory, length: int) -> Tensor | None:
    """(B, C + M + length) validity of ``[compressed memory; memory; segment]`` keys, or None
    when every key is valid."""
    if bool(state.valid.all()) and bool(state.cmem_valid.all()):
        return None
    ones = torch.ones(state.valid.shape[0], length, dtype=torch.bool, device=state.valid.device)
    return torch.cat((state.cmem_valid, state.valid, ones), dim=1)


# ============================================================================================
# Streaming generation
# ============================================================================================
class CompressiveStream(Stream):
    """Streaming decoder with a key/value cache of ``[compressed memory; memory; partial
    segment]`` per layer: per-token cost is bounded by ``cmem_len + mem_len + seq_len`` keys.
    At a segment boundary the segment is committed (FIFO, eviction, compression) with
    :meth:`CompressiveTransformer.commit`, exactly as a training forward pass does; for
    ``most_used`` the attention usage of the memory is summed over the segment's tokens."""

    model: CompressiveTransformer

    def __init__(
        self, model: CompressiveTransformer, state: CompressiveMemory | None, batch_size: int
    ) -> None:
        super().__init__(model, state, batch_size)
        cfg = model.config
        if cfg.positions == "sinusoid":  # distances never exceed C + M + T: project them once
            with torch.no_grad():
                self._sinusoid = model.positions(cfg.cmem_len + cfg.mem_len + cfg.seq_len)
        self._start_segment()

    def _start_segment(self) -> None:
        model, state = self.model, self.state
        if model.config.positions == "learned":
            self._positions = model.positions(model.position_base(state, model.config.seq_len))
        else:
            self._positions = self._sinusoid
        cached = state.cmem.shape[2] + state.mem.shape[2]
        self._kv = [
            KeyValueCache(cached + model.config.seq_len, model.memory_prefix(state, layer))
            if layer in model.memory_layers
            else KeyValueCache(model.config.seq_len)
            for layer in range(model.config.depth)
        ]
        self._hiddens: list[list[Tensor]] = [[] for _ in model.blocks]
        self._usage: Tensor | None = None

    def _commit(self) -> None:
        hiddens = [torch.cat(chunks, dim=1) for chunks in self._hiddens]
        self.state, _ = self.model.commit(self.state, self.model.written_states(hiddens), self._usage)
        self._start_segment()

    def _advance(self, input_ids: Tensor) -> Tensor:
        model, state = self.model, self.state
        num_cmem, num_mem = state.cmem.shape[2], state.mem.shape[2]
        segment_len = self.partial_len + input_ids.shape[1]
        key_valid = prefix_validity(state, segment_len)
        # the segment is committed whole: it evicts memories iff M + seq_len > mem_len
        cfg = model.config
        most_used = cfg.compression == "most_used" and num_mem + cfg.seq_len > cfg.mem_len
        usages = []
        x = model.embed(input_ids)
        for layer, block in enumerate(model.blocks):
            has_memory = layer in model.memory_layers
            num_keys = segment_len + (num_cmem + num_mem if has_memory else 0)
            usage_columns = (num_cmem, num_cmem + num_mem) if most_used and has_memory else None
            out = block(
                x, self._kv[layer], self._positions[layer][:, -num_keys:],
                key_valid if has_memory else None, usage_columns,
            )
            x = out.x  # (the attention appended the new keys and values to the cache)
            self._hiddens[layer].append(out.h)
            if out.usage is not None:
                usages.append(out.usage)
        if usages:
            usage = torch.stack(usages)
            self._usage = usage if self._usage is None else self._usage + usage
        return model.head(model.norm(x))


# ============================================================================================
# The reference package (compressive-transformer-pytorch)
# ============================================================================================
REFERENCE_CLASS = "compressive_transformer_pytorch.compressive_transformer_pytorch.CompressiveTransformer"


def _reference_names(cfg: CompressiveConfig, memory_layers: list[int]) -> dict[str, str]:
    """memtx parameter name -> reference parameter name."""
    names = {
        "embed.weight": "token_emb.weight",
        "head.weight": "to_logits.1.weight",
        "head.bias": "to_logits.1.bias",
        "pos_table": "pos_emb",
    }
    for i in range(cfg.depth):
        for part, ref_list, inner in (("attn", "attn_layers", ("to_q.weight", "to_kv.weight",
                                       "to_out.weight", "to_out.bias")),
                                      ("ff", "ff_layers", ("w1.weight", "w1.bias", "w2.weight", "w2.bias"))):
            ref = f"{ref_list}.{i}"
            for p in ("weight", "bias"):
                names[f"blocks.{i}.{part}_norm.{p}"] = f"{ref}.fn.norm.{p}"
            for p in inner:
                names[f"blocks.{i}.{part}.{p}"] = f"{ref}.fn.fn.{p}"
            if cfg.gru_gated_residual:
                for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    names[f"blocks.{i}.{part}_gate.cell.{p}"] = f"{ref}.gru.{p}"
            if cfg.mogrify_gru:
                for m in ("Q", "R"):
                    for k in ("0", "1"):
                        for p in ("weight", "bias"):
                            names[f"blocks.{i}.{part}_gate.mogrifier.{m}.{k}.{p}"] = (
                                f"{ref}.mogrify.{m}.0.{k}.{p}"
                            )
        if i in memory_layers:
            for p in ("weight", "bias"):
                names[f"blocks.{i}.compress.conv.{p}"] = f"attn_layers.{i}.fn.fn.compress_mem_fn.conv.{p}"
    return names


def from_reference_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    seq_len: int,
    mem_len: int,
    cmem_len: int,
    **config_fields: Any,
) -> CompressiveTransformer:
    """A memtx model with the weights of a reference ``CompressiveTransformer`` checkpoint.

    Sizes, gating, Mogrifier, GLU and the compression ratio are read from the tensors; the
    segment and memory lengths are not stored in a reference checkpoint and must be given (their
    sum is checked against the position table). Other config fields (``memory_layers``,
    ``enhanced_recurrence``, dropouts, ...) may be passed; the skeleton is the reference's
    (``positions="learned"``, ``final_norm=False``, ``compression="conv"``). memtx's
    ``enhanced_recurrence`` is the corrected one, so outputs match the reference only with it off.

    Example: ``from_reference_state_dict(torch.load(path, weights_only=True), seq_len=512,
    mem_len=512, cmem_len=128, memory_layers=(4, 5, 6))``.
    """
    sd = dict(state_dict)
    if "token_emb.weight" not in sd or "pos_emb" not in sd:
        raise InputError(
            "not a compressive_transformer_pytorch CompressiveTransformer state_dict "
            "(no token_emb.weight / pos_emb)"
        )
    if any(k.startswith("to_model_dim.") for k in sd):
        raise InputError("reference models with emb_dim != dim are not supported")
    vocab_size, dim = sd["token_emb.weight"].shape
    heads, table_len, _ = sd["pos_emb"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("attn_layers."))
    gru = "attn_layers.0.gru.weight_ih" in sd
    w1 = sd["ff_layers.0.fn.fn.w1.weight"].shape[0]
    hidden = sd["ff_layers.0.fn.fn.w2.weight"].shape[1]
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size, dim=dim, depth=depth, heads=heads, seq_len=seq_len,
        mem_len=mem_len, cmem_len=cmem_len,
        compress_ratio=sd["attn_layers.0.fn.fn.compress_mem_fn.conv.weight"].shape[2],
        positions="learned", final_norm=False, compression="conv", gru_gated_residual=gru,
        mogrify_gru=gru and "attn_layers.0.mogrify.Q.0.0.weight" in sd,
        ff_glu=w1 == 2 * hidden, ff_mult=hidden // dim,
    )
    fields.update(config_fields)
    cfg = CompressiveConfig.from_dict(fields)
    if table_len != seq_len + mem_len + cmem_len:
        raise InputError(
            f"the checkpoint's position table has {table_len} rows but seq_len + mem_len + "
            f"cmem_len = {seq_len + mem_len + cmem_len}; pass the lengths it was trained with"
        )
    model = CompressiveTransformer(cfg)
    names = _reference_names(cfg, model.memory_layers)
    own = model.state_dict()
    missing = sorted(set(own) - set(names))
    absent = sorted(r for r in names.values() if r not in sd)
    if missing or absent:
        raise InputError(
            f"cannot map the reference checkpoint onto {cfg}: memtx parameters without a "
            f"source {missing}, reference tensors missing {absent}"
        )
    with torch.no_grad():
        for name, ref_name in names.items():
            if own[name].shape != sd[ref_name].shape:
                raise InputError(
                    f"{ref_name} has shape {tuple(sd[ref_name].shape)} but memtx's {name} "
                    f"needs {tuple(own[name].shape)}"
                )
            own[name].copy_(sd[ref_name])
    return model


@register_converter(REFERENCE_CLASS)
def from_reference(reference: nn.Module) -> CompressiveTransformer:
    """The memtx model equivalent to a live reference ``CompressiveTransformer``."""
    layer = reference.attn_layers[0]
    attn = layer.fn.fn
    ff = reference.ff_layers[0].fn.fn
    return from_reference_state_dict(
        reference.state_dict(),
        seq_len=reference.seq_len,
        mem_len=attn.mem_len,
        cmem_len=attn.cmem_len,
        memory_layers=tuple(reference.memory_layers),
        enhanced_recurrence=reference.enhanced_recurrence,
        attn_dropout=attn.attn_dropout.p,
        attn_layer_dropout=attn.dropout.p,
        ff_dropout=ff.dropout.p,
        reconstruction_attn_dropout=attn.reconstruction_attn_dropout.p,
        reconstruction_loss_weight=float(reference.reconstruction_loss_weight),
    )
