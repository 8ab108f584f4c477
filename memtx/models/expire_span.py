"""Expire-Span (Sukhbaatar et al. 2021, *Not All Memories are Created Equal: Learning to Forget
by Expiring*): a Transformer-XL whose memory entries learn when to expire.

Every layer keeps its past inputs as memory, as Transformer-XL does, but each entry ``h_i`` also
gets a span ``e_i = max_span * sigmoid(w . LN(h_i) + b)`` (``LN`` is the layer's own attention
norm: keys and values are projected from the same normalised vector, and it keeps ``w . h`` on a
fixed scale while the pre-norm residual stream grows; the paper's code does the same in its
pre-norm variant). A query at time ``t`` sees entry ``i`` through the soft mask

    r_ti = e_i - (t - i)                   remaining span
    m_ti = clamp(1 + r_ti / R, 0, 1)       R = ramp_len

applied to every (query, key) pair, those of the current segment included (a key at distance 0
always has ``m = 1``, so no query loses all its keys). Attention is renormalised over what remains,
``a_ti = m_ti exp(s_ti) / sum_j m_tj exp(s_tj)``, which is the softmax of ``s_ti + log m_ti``: the
mask rides in the additive score bias (``LOG_ZERO = -1e30`` where ``m = 0``, a weight of exactly
0). The seed instead multiplies the softmax output by the mask and never renormalises.

Spans are *recomputed* every segment from the stored entries (a stop-gradient) with the live
``w, b`` rather than stored in the state: stored spans would be constants, and the language-model
loss could then train ``w, b`` only through the current segment's keys; recomputed, the mask of
every (query, memory) pair in the ramp carries gradient to ``w, b``, as in the paper. It costs one
dot product per entry per layer per segment. Expiry is exact all the same: the spans that decide
which entries are dropped at the end of a segment are the ones that segment's attention used.

The span loss (``span_loss_coef``, the paper's alpha) is an L1 penalty on spans, applied only to
pairs inside the ramp (``0 < m < 1``), where the mask has a gradient:
``alpha * sum_layers mean_rows sum_{(t, i) in ramp} e_i / (R * T)`` (each entry spends R queries
in the ramp, and the sum over a segment's T queries is averaged). It is returned in ``aux_loss``.

Memory that shrinks. After a segment an entry is dropped once its mask is 0 for every future
query, i.e. ``e_i + R - age_i <= 0`` where ``age_i`` is its distance to the next segment's first
query; then at most ``mem_len`` entries are kept per row and layer (the newest). Rows and layers
keep different numbers of entries: the state stores them right-aligned (oldest first, left-padded
with ``valid=False``, the layout of :class:`memtx.state.FifoMemory`), with each entry's age, and
the common length is the longest row. Each layer attends only over its own longest row, so
memory held and attention cost follow the learned spans, not ``max_span``.

Positions. Entries are no longer contiguous, so the Transformer-XL relative term
``(q_t + v) . r_{t-i}`` uses each entry's real distance (its age plus the query's offset):
:func:`memtx.ops.attention.pairwise_relative_attention` scores every query against a table of
distances ``0..N-1`` (N is the oldest entry's distance, not ``max_span``) and gathers each
pair's distance. With a full,
contiguous memory the distances are exactly Transformer-XL's, so with every span at
``max_span >= mem_len + seq_len - 1`` this model computes what ``transformer_xl`` computes with
the same weights.

Initialisation: ``w = 0`` and ``b = logit(0.1)``, so every span starts at 10% of ``max_span``
(the paper's code, ``expire_span_init_percentage = 0.1``). The seed's ``b = -max_span`` makes the
sigmoid exactly 0 in fp32: spans, their gradient and the span loss stay 0 forever.

Random memory shortening (``shorten_prob``, the seed's "forget dropout"): in training, each row
of a segment with probability ``shorten_prob`` hides its memory entries older than a random limit
drawn uniformly from ``[0, max_span)``. It only changes what the segment's attention sees; which
entries expire is still decided by the spans (the seed multiplies it into the expiry mask in
place, so training permanently throws memory away).

Shape legend: B batch, T segment (queries), M memory entries, K = M + T keys, L layers,
E model width, H heads, D head dim, N rows of the position table (distances 0..N-1),
V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memtx.config import ModelConfig
from memtx.layers.init import init_gpt2_weights, scale_residual_projections
from memtx.errors import StateError
from memtx.generation import Stream
from memtx.layers.attention import KeyValue, KeyValueCache, with_prefix
from memtx.layers.blocks import RelativeMemoryBlock
from memtx.modeling import MemoryLM
from memtx.ops.attention import causal_blocked, pairwise_relative_attention
from memtx.ops.position import sinusoid
from memtx.registry import register
from memtx.state import State, memory_field

INIT_SPAN_FRACTION = 0.1  # spans start at this fraction of max_span (the paper's code)


@dataclass(kw_only=True)
class ExpireSpanConfig(ModelConfig):
    """Expire-Span hyper-parameters (beyond :class:`memtx.config.ModelConfig`).

    Attributes:
        max_span: the longest span L an entry can have (``e = L * sigmoid(...)``); an entry is
            visible up to ``max_span + ramp_len - 1`` positions back.
        ramp_len: length R of the mask's linear ramp from 1 to 0 once a span has passed; must be
            in [1, max_span].
        span_loss_coef: weight alpha of the L1 span loss on entries inside the ramp (0 disables
            it); it is the only force that shortens spans of entries the task does not need.
        shorten_prob: in training, probability that a row's memory is randomly shortened for one
            segment (entries older than a uniform limit in ``[0, max_span)`` are hidden).
        mem_len: cap on the entries each layer keeps per row (the newest are kept).
        head_dim: width of each attention head (default ``dim // heads``).
        ff_mult: feed-forward hidden width as a multiple of ``dim``.
        dropout: dropout on embeddings, position embeddings and residual branches.
        attn_dropout: dropout on attention weights.
        tie_embeddings: use the input embedding matrix as the output projection.
    """

    max_span: int = 1024
    ramp_len: int = 32
    span_loss_coef: float = 1e-6
    shorten_prob: float = 0.0
    mem_len: int = 1024
    head_dim: int | None = None
    ff_mult: int = 4
    dropout: float = 0.0
    attn_dropout: float = 0.0
    tie_embeddings: bool = True

    def validate(self) -> None:
        super().validate()
        self.require(self.dim % 2 == 0, "dim", "must be even (sinusoidal position embeddings)")
        if self.head_dim is None:
            self.require(
                self.dim % self.heads == 0, "dim",
                f"must be divisible by heads={self.heads}, or set head_dim",
            )
        else:
            self.require(self.head_dim >= 1, "head_dim", "must be positive")
        self.require(self.max_span >= 1, "max_span", "must be at least 1")
        self.require(
            1 <= self.ramp_len <= self.max_span, "ramp_len",
            f"must be in [1, max_span={self.max_span}] (the mask's ramp from 1 to 0)",
        )
        self.require(self.span_loss_coef >= 0.0, "span_loss_coef", "must be >= 0 (0 disables it)")
        self.require(0.0 <= self.shorten_prob <= 1.0, "shorten_prob", "must be in [0, 1]")
        self.require(self.mem_len >= 1, "mem_len", "must be at least 1")
        self.require(self.ff_mult >= 1, "ff_mult", "must be at least 1")
        self.require_probabilities("dropout", "attn_dropout")


@dataclass(frozen=True)
class ExpireSpanMemory(State):
    """Per-layer memories of different lengths, right-aligned in one padded tensor.

    ``mem[l, b]`` holds layer ``l``'s kept inputs for row ``b``, oldest first, after
    ``valid[l, b].logical_not().sum()`` padding slots; ``age[l, b, m]`` is the distance from
    entry ``m`` to the first query of the next segment (>= 1 for valid entries, 0 for padding).
    Each layer expires its own entries, so the masks differ between layers.
    """

    mem: Tensor = memory_field("layer", "batch", "mem", "dim")  # (L, B, M, E)
    valid: Tensor = memory_field("layer", "batch", "mem", fill=False)  # (L, B, M) bool
    age: Tensor = memory_field("layer", "batch", "mem", fill=0)  # (L, B, M) long

    def held(self) -> Tensor:
        """(L, B) number of entries each layer keeps for each row."""
        return self.valid.sum(-1)


def expire_mask(spans: Tensor, distances: Tensor, ramp_len: int) -> Tensor:
    """Reference mask ``clamp(1 + (e - distance) / R, 0, 1)`` of every pair:
    spans (B, K), distances (B, T, K) -> (B, T, K)."""
    return (1.0 + (spans[:, None, :] - distances.to(spans.dtype)) / ramp_len).clamp(0.0, 1.0)


# ``log 0`` in the score bias: finite, yet every softmax still gives those pairs weight exactly 0
# (each row keeps a finite score, and exp(-1e30 - max) underflows to 0 in any float type). On
# CPUs ``log`` takes a slow path for every 0, which made the log of a mask with many expired
# pairs 5.7x slower than the finite form (1.38 vs 0.24 ms for (4, 256, 300) floats).
LOG_ZERO = -1e30


def log_mask(mask: Tensor) -> Tensor:
    """``log m`` for a mask in [0, 1], with :data:`LOG_ZERO` where ``m = 0``: the log of
    ``max(m, tiny)`` plus ``LOG_ZERO (1 - ceil(m))``, which is 0 unless ``m = 0``."""
    tiny = torch.finfo(mask.dtype).tiny
    return mask.clamp_min(tiny).log_().add_(mask.ceil().sub_(1.0), alpha=-LOG_ZERO)


class _LogMask(torch.autograd.Function):
    """:func:`log_mask` with a zero gradient where ``m = 0`` (``log``'s own backward would
    give ``0 / 0`` there, and ``clamp`` pass it on when ``m`` is exactly 0)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return log_mask(mask)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        (mask,) = ctx.saved_tensors
        return torch.where(mask > 0, grad / mask, 0.0)


def expire_reach(spans: Tensor, base: Tensor, valid: Tensor, ramp_len: int) -> Tensor:
    """(B, K) each key's mask at segment position 0 before clamping, ``(e + R - base) / R``
    (``-inf`` for invalid keys): the mask at segment position q is ``clamp(reach - q / R, 0, 1)``.

    Args:
        spans: (B, K) spans of the keys.
        base: (B, K) long: each key's distance to segment position 0 (its age for memory
            entries, ``-j`` for segment position j).
        valid: (B, K) bool.
    """
    reach = (spans + ramp_len - base) / ramp_len
    return reach.masked_fill(~valid, float("-inf"))


def log_mask_from_reach(reach: Tensor, first_query: int, num_queries: int, ramp_len: int) -> Tensor:
    """``log m`` (B, T, K) for queries at segment positions ``first_query + i`` of keys whose
    :func:`expire_reach` is ``reach`` (B, K); :data:`LOG_ZERO` where ``m = 0``."""
    if num_queries == 1:
        mask = (reach[:, None, :] - first_query / ramp_len).clamp_(0.0, 1.0)
    else:
        queries = torch.arange(
            first_query, first_query + num_queries, device=reach.device, dtype=reach.dtype
        )
        mask = (reach[:, None, :] - queries[None, :, None] / ramp_len).clamp(0.0, 1.0)
    return _LogMask.apply(mask) if mask.requires_grad else log_mask(mask)


def log_expire_mask(
    spans: Tensor, base: Tensor, valid: Tensor, first_query: int, num_queries: int, ramp_len: int
) -> Tensor:
    """``log m`` (B, T, K) for queries at segment positions ``first_query + i`` and keys at
    distance ``base + first_query + i`` from them (:data:`LOG_ZERO` where ``m = 0``, invalid
    keys included); arguments as in :func:`expire_reach`.

    Equals ``log(expire_mask(spans, distances, R))``; written as one broadcast subtraction of a
    per-key and a per-query term, because the (B, T, K) mask is built for every layer.
    """
    reach = expire_reach(spans, base, valid, ramp_len)
    return log_mask_from_reach(reach, first_query, num_queries, ramp_len)


def ramp_counts(
    spans: Tensor, base: Tensor, valid: Tensor, first_query: int, num_queries: int, ramp_len: int
) -> Tensor:
    """(B, K) number of queries (as in :func:`log_expire_mask`) for which each key is inside its
    ramp, ``0 < m < 1``, i.e. ``e < distance < e + R``: counted per key, not per pair."""
    spans = spans.detach()
    first = (torch.floor(spans - base) + 1).clamp(min=first_query)  # first q with d > e
    last = (torch.ceil(spans + ramp_len - base) - 1).clamp(max=first_query + num_queries - 1)
    return (last - first + 1).clamp(min=0) * valid


@dataclass
class LayerMemory:
    """What one layer attends to besides the segment: its memory trimmed to its longest row.

    Attributes:
        kv: keys and values (B, H, M, D) of the normalised entries.
        spans: (B, M) spans of the entries (with gradient to the span predictor in training).
        age: (B, M) long distance of each entry to the segment's first query.
        valid: (B, M) bool.
        mem: (B, M, E) the entries themselves (to carry the kept ones over).
        base: (B, M + seq_len) long distance of every key a segment can have to its first
            query: the entries' ages, then ``-j`` for segment position j (made once per
            segment; each call slices the keys it has).
        key_valid: (B, M + seq_len) bool validity of the same keys.
        oldest: the largest age (0 for an empty memory).
    """

    kv: KeyValue | None
    spans: Tensor
    age: Tensor
    valid: Tensor
    mem: Tensor
    base: Tensor
    key_valid: Tensor
    oldest: int


@dataclass
class SegmentCache:
    """What a streaming decoder keeps for one layer while a segment is being fed.

    Attributes:
        kv: keys and values of the memory and of the segment's positions fed so far.
        spans: (B, seq_len) spans of the segment's positions (the first ``length`` are set).
        reach: (B, M + seq_len) :func:`expire_reach` of every key the segment can have,
            written for each position as it is fed.
    """

    kv: KeyValueCache
    spans: Tensor
    reach: Tensor


@register("expire_span")
class ExpireSpan(MemoryLM):
    """Expire-Span language model under the memtx contract (see module docstring)."""

    config_class = ExpireSpanConfig
    state_class = ExpireSpanMemory

    def __init__(self, config: ExpireSpanConfig) -> None:
        super().__init__(config)
        cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            RelativeMemoryBlock(
                cfg.dim, cfg.heads, cfg.head_dim, ff_mult=cfg.ff_mult,
                dropout=cfg.dropout, attn_dropout=cfg.attn_dropout,
            )
            for _ in range(cfg.depth)
        )
        self.span_predictors = nn.ModuleList(nn.Linear(cfg.dim, 1) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # the same initialisation as transformer_xl, so the two differ only by the spans
        self.apply(init_gpt2_weights)
        scale_residual_projections(self.blocks, cfg.depth)
        for predictor in self.span_predictors:
            nn.init.zeros_(predictor.weight)
            nn.init.constant_(
                predictor.bias, math.log(INIT_SPAN_FRACTION / (1 - INIT_SPAN_FRACTION))
            )
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    # -- state ---------------------------------------------------------------------------------
    def init_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ExpireSpanMemory:
        cfg = self.config
        device = self.device if device is None else device
        return ExpireSpanMemory(
            mem=torch.zeros(
                cfg.depth, batch_size, 0, cfg.dim, device=device, dtype=dtype or self.dtype
            ),
            valid=torch.zeros(cfg.depth, batch_size, 0, dtype=torch.bool, device=device),
            age=torch.zeros(cfg.depth, batch_size, 0, dtype=torch.long, device=device),
        )

    def state_limits(self) -> dict[str, int]:
        return {"mem": self.config.mem_len}

    def segments_to_fill(self) -> int:
        """An entry is kept while ``e + R - age > 0`` with ``e <= max_span``, so at most
        ``max_span + ramp_len - 1`` entries, and at most ``mem_len``, whichever binds first."""
        cfg = self.config
        return math.ceil(min(cfg.mem_len, cfg.max_span + cfg.ramp_len - 1) / cfg.seq_len)

    def check_state(self, state: ExpireSpanMemory, batch_size: int, device: torch.device) -> None:
        super().check_state(state, batch_size, device)
        if state.valid.dtype != torch.bool:
            raise StateError(f"state.valid must be a bool mask, got dtype {state.valid.dtype}")
        if state.age.dtype.is_floating_point or state.age.dtype == torch.bool:
            raise StateError(
                f"state.age must hold integer elapsed times, got dtype {state.age.dtype}"
            )

    def spans(self, layer: int, normed: Tensor) -> Tensor:
        """(B, N) spans of normalised entries (B, N, E) of layer ``layer``."""
        predictor = self.span_predictors[layer]
        # F.linear rather than the module call: a streamed token pays this once per layer
        logits = F.linear(normed, predictor.weight, predictor.bias).squeeze(-1)
        # at least float32 (bf16 under autocast), float64 models keep float64
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return self.config.max_span * torch.sigmoid(logits)

    def layer_memory(self, state: ExpireSpanMemory, layer: int) -> LayerMemory:
        """Layer ``layer``'s memory, cut to its longest row (entries are right-aligned)."""
        held = int(state.valid[layer].sum(-1).max()) if state.valid.shape[2] else 0
        start = state.mem.shape[2] - held
        mem = state.mem[layer, :, start:]
        block = self.blocks[layer]
        normed = block.attn_norm(mem)
        age, valid = state.age[layer, :, start:], state.valid[layer, :, start:]
        seq_len = self.config.seq_len
        segment = torch.arange(0, -seq_len, -1, device=age.device).expand(age.shape[0], -1)
        return LayerMemory(
            kv=block.attn.project_kv(normed) if held else None,
            spans=self.spans(layer, normed),
            age=age,
            valid=valid,
            mem=mem,
            base=torch.cat((age, segment), dim=1),
            key_valid=F.pad(valid, (0, seq_len), value=True),
            oldest=int(age.max()) if held else 0,
        )

    def position_table(self, num_distances: int, device: torch.device) -> Tensor:
        """(N, E) sinusoids of the distances 0, 1, ..., N-1."""
        return sinusoid(torch.arange(num_distances, device=device), self.config.dim).to(self.dtype)

    # -- one layer -----------------------------------------------------------------------------
    def attend(
        self,
        layer: int,
        x: Tensor,
        memory: LayerMemory,
        cache: SegmentCache | None,
        r: Tensor,
        hide_older_than: Tensor | None = None,
        with_loss: bool = True,
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor], Tensor]:
        """Run block ``layer`` on ``x`` (B, T, E), placed after ``prefix`` in its segment.

        Args:
            memory: the layer's memory.
            cache: when streaming, what the segment's first P positions left (``x``'s keys,
                values, spans and reach are added to it); None in training.
            r: (H, N, D) projected position table covering every distance in use.
            hide_older_than: optional (B,) long; memory entries at least this old are hidden
                from this segment's attention (random shortening).
            with_loss: compute the span loss (streaming generation does not need it).

        Returns:
            The block's output (B, T, E), the keys, values and spans of ``x``, and the
            unweighted span loss summed over pairs in the ramp, divided by (R T B).

        This is :class:`RelativeMemoryBlock`'s forward with two changes: the position scores
        come from per-pair distances, and ``log m`` joins the score bias. The shared
        :class:`RelativeMemoryAttention` derives distances from key indices, which no longer
        give distances once entries are dropped.
        """
        cfg = self.config
        block = self.blocks[layer]
        attn = block.attn
        batch, length, _ = x.shape
        # positions of the segment fed before x: the cached keys beyond the memory
        offset = 0 if cache is None else cache.kv.length - memory.age.shape[1]

        h = block.attn_norm(x)
        new_spans = self.spans(layer, h)  # (B, T)
        q = attn.to_q(h).view(batch, length, attn.heads, attn.head_dim).transpose(1, 2)
        k_new, v_new = attn.project_kv(h)  # (B, H, T, D)
        # every key's distance to segment position 0: its age, or -j for segment position j
        num_keys = memory.age.shape[1] + offset + length
        base, key_valid = memory.base[:, :num_keys], memory.key_valid[:, :num_keys]  # (B, K)
        span_loss = None
        if cache is not None:  # streaming: only the new positions' terms are computed
            k, v = with_prefix(cache.kv, k_new, v_new)
            cache.spans[:, offset : offset + length] = new_spans
            # expire_reach of segment positions j (base -j, always valid): (e + R + j) / R
            positions = offset if length == 1 else torch.arange(
                offset, offset + length, device=x.device, dtype=new_spans.dtype
            )
            torch.div(new_spans + (positions + cfg.ramp_len), cfg.ramp_len,
                      out=cache.reach[:, num_keys - length : num_keys])
            reach = cache.reach[:, :num_keys]
        else:
            k, v = with_prefix(memory.kv, k_new, v_new)
            all_spans = torch.cat((memory.spans, new_spans), dim=-1)  # (B, K)
            if with_loss:
                counts = ramp_counts(all_spans, base, key_valid, offset, length, cfg.ramp_len)
                span_loss = (counts * all_spans).sum() / (cfg.ramp_len * length * batch)
            if hide_older_than is not None:
                seen = memory.age < hide_older_than[:, None]  # (B, M)
                key_valid = key_valid & F.pad(seen, (0, offset + length), value=True)
            reach = expire_reach(all_spans, base, key_valid, cfg.ramp_len)
        bias = log_mask_from_reach(reach, offset, length, cfg.ramp_len)  # (B, T, K)
        distances = base[:, None, :] + offset  # (B, 1, K) for the segment's first query
        if length > 1:  # keys after a query: the causal mask joins the (B, T, K) bias
            bias = bias.masked_fill(causal_blocked(length, num_keys, x.device), float("-inf"))
            queries = torch.arange(length, device=x.device)
            distances = (distances + queries[None, :, None]).clamp(min=0)  # (B, T, K)
        else:  # one query sees every key, at distances >= 0
            distances = distances.expand(-1, length, -1)
        out = pairwise_relative_attention(
            q + attn.content_bias[:, None, :],
            q + attn.position_bias[:, None, :],
            k,
            v,
            r,
            distances,
            bias.to(q.dtype),
            scale=attn.scale,
            dropout_p=attn.attn_dropout if self.training else 0.0,
            causal=length > 1,  # the bias carries the causal mask (above)
        )
        out = out.transpose(1, 2).reshape(batch, length, -1)
        x = x + attn.dropout(attn.to_out(out))
        x = x + block.ff_dropout(block.ff(block.ff_norm(x)))
        if span_loss is None:
            span_loss = x.new_zeros((), dtype=torch.float32)
        return x, (k_new, v_new, new_spans), span_loss

    # -- expiry --------------------------------------------------------------------------------
    def expire(
        self,
        memories: list[LayerMemory],
        hiddens: Tensor,
        spans: list[Tensor],
    ) -> ExpireSpanMemory:
        """The state after a segment whose layer inputs are ``hiddens`` (L, B, T, E) and whose
        keys ``[memory; segment]`` had spans ``spans[l]`` (B, M_l + T): entries whose mask is 0
        for the next segment's first query are dropped, then all but the newest ``mem_len``;
        the rest is compacted to the right of each row."""
        cfg = self.config
        length = hiddens.shape[2]
        new_age = torch.arange(length, 0, -1, device=hiddens.device)  # T, ..., 1
        kept = []
        for memory, layer_inputs, layer_spans in zip(memories, hiddens, spans):
            batch = layer_inputs.shape[0]
            age = torch.cat((memory.age + length, new_age.expand(batch, -1)), dim=1)  # (B, K)
            valid = F.pad(memory.valid, (0, length), value=True)
            # the next query sees an entry iff its mask there is > 0, i.e. e + R - age > 0
            keep = valid & (layer_spans.detach() + cfg.ramp_len - age > 0)
            newer = keep.flip(-1).cumsum(-1).flip(-1)  # kept entries at or after each one
            keep = keep & (newer <= cfg.mem_len)
            mem = torch.cat((memory.mem, layer_inputs.detach().to(memory.mem.dtype)), dim=1)
            kept.append((mem, keep, age))
        num_kept = max(int(keep.sum(-1).max()) for _, keep, _ in kept)
        mems, valids, ages = [], [], []
        for mem, keep, age in kept:
            if keep.shape[1] < num_kept:  # a layer shorter than the longest kept row elsewhere
                pad = num_kept - keep.shape[1]
                mem = F.pad(mem, (0, 0, pad, 0))
                keep, age = F.pad(keep, (pad, 0)), F.pad(age, (pad, 0))
            # a stable sort puts dropped entries first and kept ones last, in time order
            order = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices
            order = order[:, order.shape[1] - num_kept :]
            valid = keep.gather(1, order)
            mems.append(mem.gather(1, order[..., None].expand(-1, -1, mem.shape[-1]))
                        * valid[..., None])
            valids.append(valid)
            ages.append(age.gather(1, order) * valid)
        return ExpireSpanMemory(
            mem=torch.stack(mems), valid=torch.stack(valids), age=torch.stack(ages)
        )

    # -- forward -------------------------------------------------------------------------------
    def forward_segment(
        self, input_ids: Tensor, state: ExpireSpanMemory
    ) -> tuple[Tensor, ExpireSpanMemory, Tensor]:
        cfg = self.config
        batch, length = input_ids.shape
        x = self.dropout(self.embed(input_ids))
        memories = [self.layer_memory(state, i) for i in range(cfg.depth)]
        oldest = int(state.age.max()) if state.age.numel() else 0
        pos_emb = self.dropout(self.position_table(oldest + length, x.device))
        hide = None
        if self.training and cfg.shorten_prob > 0:
            shortened = torch.rand(batch, device=x.device) < cfg.shorten_prob
            limit = torch.randint(0, cfg.max_span, (batch,), device=x.device)
            # rows not shortened get a limit no entry reaches (ages stay below e + R)
            unreachable = torch.full_like(limit, cfg.max_span + cfg.ramp_len)
            hide = torch.where(shortened, limit, unreachable)
        layer_inputs, spans = [], []
        span_loss = torch.zeros((), device=x.device, dtype=torch.float32)
        for i, (block, memory) in enumerate(zip(self.blocks, memories)):
            layer_inputs.append(x)
            r = block.attn.project_positions(pos_emb[: memory.oldest + length])
            x, (_, _, new_spans), loss = self.attend(i, x, memory, None, r, hide)
            spans.append(torch.cat((memory.spans, new_spans), dim=1))
            span_loss = span_loss + loss
        logits = self.head(self.norm(x))
        next_state = self.expire(memories, torch.stack(layer_inputs), spans)
        return logits, next_state, cfg.span_loss_coef * span_loss

    def stream(
        self, state: ExpireSpanMemory | None = None, batch_size: int = 1
    ) -> "ExpireSpanStream":
        return ExpireSpanStream(self, state, batch_size)


class ExpireSpanStream(Stream):
    """Streaming decoder with a key/value cache of ``[memory; partial segment]`` per layer.

    At the start of a segment each layer's memory is projected once (keys, values, spans, and
    each entry's :func:`expire_reach`) and the position table is built up to the oldest entry;
    every new token then adds its own key, value, span and reach to the layer's
    :class:`SegmentCache` and costs one query against at most ``mem_len + seq_len`` keys, as in
    :class:`TransformerXLStream`, and fewer when entries have expired. At a segment boundary the
    segment is committed with :meth:`ExpireSpan.expire`, exactly as a training forward pass does.
    """

    model: ExpireSpan

    def __init__(self, model: ExpireSpan, state: ExpireSpanMemory | None, batch_size: int) -> None:
        super().__init__(model, state, batch_size)
        self._start_segment()

    def _start_segment(self) -> None:
        model = self.model
        self._memories = [model.layer_memory(self.state, i) for i in range(model.config.depth)]
        pos_emb = model.position_table(
            (int(self.state.age.max()) if self.state.age.numel() else 0) + model.config.seq_len,
            model.device,
        )
        # per layer, distances up to its oldest entry's from the segment's last position
        self._positions = [
            block.attn.project_positions(pos_emb[: m.oldest + model.config.seq_len])
            for block, m in zip(model.blocks, self._memories)
        ]
        seq_len, ramp_len = model.config.seq_len, model.config.ramp_len
        self._caches = []
        for m in self._memories:
            reach = m.spans.new_empty(self.batch_size, m.mem.shape[1] + seq_len)
            reach[:, : m.mem.shape[1]] = expire_reach(m.spans, m.age, m.valid, ramp_len)
            self._caches.append(SegmentCache(
                kv=KeyValueCache(m.mem.shape[1] + seq_len, m.kv),
                spans=m.spans.new_empty(self.batch_size, seq_len),
                reach=reach,
            ))
        self._layer_inputs: list[list[Tensor]] = [[] for _ in model.blocks]

    def _commit(self) -> None:
        hiddens = torch.stack([torch.cat(chunks, dim=1) for chunks in self._layer_inputs])
        spans = [torch.cat((m.spans, c.spans), dim=1) for m, c in zip(self._memories, self._caches)]
        self.state = self.model.expire(self._memories, hiddens, spans)
        self._start_segment()

    def _advance(self, input_ids: Tensor) -> Tensor:
        model = self.model
        x = model.embed(input_ids)
        for i in range(len(model.blocks)):
            self._layer_inputs[i].append(x)
            memory = self._memories[i]
            # distances reach the oldest entry's from this chunk's last position, no further
            r = self._positions[i][:, : memory.oldest + self.partial_len + input_ids.shape[1]]
            x, _, _ = model.attend(i, x, memory, self._caches[i], r, with_loss=False)
        return model.head(model.norm(x))
