"""Memformer (Wu et al. 2020/2022): a fixed set of memory slots, read by cross-attention and
written by slot attention + GRU, trained through the memory with memory replay backprop.

Faithful to the seed (lucidrains' ``memformer==0.3.1``):

* **Encoder** layers, pre-norm with residuals: self-attention with a T5-style bucketed relative
  position bias (one table shared by all layers), cross-attention to the memory slots (the raw
  slots are keys and values), feed-forward; a final LayerNorm.
* **Memory writer**, repeated ``num_mem_updates`` times: every slot attends to itself and to the
  encoder outputs (not to the other slots), a GRU cell takes the result as input and the old slot
  as hidden state, then a pre-norm residual feed-forward.
* **Learned initial slots**, used wherever a row's memory is empty.
* **Decoder** (encoder-decoder mode): causal self-attention with its own relative bias,
  cross-attention to the encoder outputs, feed-forward, final norm and output projection.

Three modes (``MemformerConfig.mode``), one model class:

* ``"lm"`` (default): a language model under the memtx contract. The encoder is *causal* and
  carries the output head; each segment reads the memory written after the previous segment and
  writes the memory for the next one from its own hidden states. ``memtx train / eval /
  generate`` use it like every other architecture; streaming generation has a key/value cache.
* ``"encoder_decoder"``: the seed's sequence-to-sequence model. :meth:`Memformer.seq2seq` encodes
  a source segment (bidirectionally, reading the memory) and decodes a target segment with teacher
  forcing; :meth:`Memformer.generate_seq2seq` decodes with a key/value cache. Use it for tasks
  where a target is conditioned on a source and on earlier (source, target) pairs, e.g. dialogue.
* ``"encoder"``: the seed's encoder-only model. :meth:`Memformer.encode` returns bidirectional
  encoder outputs and the next memory, for a head of your own (classification, retrieval).

Where memtx deliberately differs from the seed (each has a test):

* The seed's encoder is bidirectional with unmasked cross-attention, so a language model built
  on it sees the future; the ``lm`` mode's encoder is causal.
* The seed's encoder buckets relative positions one-sidedly (``max(q - k, 0)``): every key to the
  right of a query shares the query's own bucket, so a bidirectional encoder cannot tell right
  from here. memtx uses T5's bidirectional buckets there (half of the table for each side);
  ``relative_buckets="seed"`` restores the seed's buckets for parity with its checkpoints.
  (One-sided buckets are right for a causal stack: the ``lm`` encoder uses them.)
* The memory returned carries its autograd graph (the seed's does too), so backprop through time
  and :func:`memtx.training.mrbp.mrbp` reach the writer from later segments' losses; the trainer
  detaches with ``state.detach()``.
* The seed's ``decoder.generate`` raises ``TypeError``; memtx's generation works.

Attention masks use the most negative finite value, as the seed does, so a fully masked row
(a padded query) attends uniformly instead of producing NaN.

Shape legend: B batch, T segment (source or target), S source, N memory slots, H heads,
D head dim, E model width, V vocabulary.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memtx.config import ModelConfig
from memtx.errors import InputError
from memtx.generation import Stream, _check_sampling, sample_next
from memtx.layers.attention import KeyValue, KeyValueCache, with_prefix
from memtx.layers.feedforward import FeedForward
from memtx.modeling import IGNORE_INDEX, MemoryLM, lm_loss
from memtx.reference import register_converter
from memtx.registry import register
from memtx.state import State, memory_field

Mode = Literal["lm", "encoder_decoder", "encoder"]


# ============================================================================================
# Configuration and state
# ============================================================================================


@dataclass(kw_only=True)
class MemformerConfig(ModelConfig):
    """Memformer hyper-parameters (beyond :class:`memtx.config.ModelConfig`).

    ``depth`` and ``heads`` are the encoder's (and the decoder's heads); ``seq_len`` bounds both
    source and target segments.

    Attributes:
        mode: ``"lm"`` (causal encoder + output head, the memtx contract), ``"encoder_decoder"``
            (the seed's seq2seq model) or ``"encoder"`` (the seed's encoder-only model); see the
            module docstring.
        num_memory_slots: N, the number of memory slots.
        num_mem_updates: how many times the writer (slot attention, GRU, feed-forward) runs per
            segment.
        mem_update_heads: attention heads of the writer's slot attention.
        decoder_depth: decoder layers in ``encoder_decoder`` mode (None: ``depth``).
        decoder_vocab_size: target vocabulary in ``encoder_decoder`` mode (None: ``vocab_size``).
        ff_mult: feed-forward hidden width as a multiple of ``dim``.
        num_buckets: relative-position buckets (rows of each bias table).
        max_distance: distance at which the logarithmic buckets saturate.
        relative_buckets: buckets of the *bidirectional* encoder: ``"bidirectional"`` (T5: half
            the buckets for keys on each side) or ``"seed"`` (the seed's one-sided buckets, where
            keys to the right share the query's bucket; a compatibility switch for seed
            checkpoints, see :func:`from_seed`). Not allowed in ``lm`` mode, whose causal encoder
            always uses one-sided buckets.
    """

    mode: Mode = "lm"
    num_memory_slots: int = 32
    num_mem_updates: int = 1
    mem_update_heads: int = 8
    decoder_depth: int | None = None
    decoder_vocab_size: int | None = None
    ff_mult: int = 4
    num_buckets: int = 32
    max_distance: int = 128
    relative_buckets: Literal["bidirectional", "seed"] = "bidirectional"

    def validate(self) -> None:
        super().validate()
        self.require(self.dim % self.heads == 0, "dim", f"must be divisible by heads={self.heads}")
        self.require(
            self.num_memory_slots >= 1, "num_memory_slots",
            "must be at least 1 (the memory is a set of slots; Memformer without slots is a "
            "plain transformer)",
        )
        self.require(self.num_mem_updates >= 1, "num_mem_updates", "must be at least 1")
        self.require(self.mem_update_heads >= 1, "mem_update_heads", "must be at least 1")
        self.require(
            self.dim % self.mem_update_heads == 0, "mem_update_heads",
            f"must divide dim={self.dim}",
        )
        self.require(self.ff_mult >= 1, "ff_mult", "must be at least 1")
        self.require(self.num_buckets >= 4, "num_buckets", "must be at least 4")
        self.require(
            self.max_distance > self.num_buckets // 2, "max_distance",
            f"must exceed num_buckets // 2 = {self.num_buckets // 2} (the exact buckets)",
        )
        decoder_only = "only applies to mode='encoder_decoder'; leave it None"
        if self.mode != "encoder_decoder":
            self.require(self.decoder_depth is None, "decoder_depth", decoder_only)
            self.require(self.decoder_vocab_size is None, "decoder_vocab_size", decoder_only)
        if self.decoder_depth is not None:
            self.require(self.decoder_depth >= 1, "decoder_depth", "must be at least 1")
        if self.decoder_vocab_size is not None:
            self.require(self.decoder_vocab_size >= 2, "decoder_vocab_size", "must be at least 2")
        if self.mode == "lm":
            self.require(
                self.relative_buckets == "bidirectional", "relative_buckets",
                "only applies to the bidirectional encoder (mode 'encoder_decoder' or 'encoder'); "
                "the causal lm encoder always uses one-sided buckets",
            )

    @property
    def target_vocab_size(self) -> int:
        return self.decoder_vocab_size or self.vocab_size


@dataclass(frozen=True)
class MemformerState(State):
    """The memory slots of every row.

    ``initialised[b]`` is False where row ``b`` has no memory yet (a fresh stream, or a row
    cleared by :meth:`State.reset`, which zero-fills): the model reads its *learned* initial
    slots there instead of ``slots[b]``, so a reset row is exactly a fresh stream.
    """

    slots: Tensor = memory_field("batch", "slot", "dim")  # (B, N, E)
    initialised: Tensor = memory_field("batch", fill=False)  # (B,) bool


@dataclass
class Seq2SeqOutput:
    """What :meth:`Memformer.seq2seq` returns."""

    logits: Tensor  # (B, T, V) next-token logits at every target position
    state: MemformerState  # the memory after the source segment
    loss: Tensor | None  # mean cross-entropy over ``targets`` (ignore_index -100), if given
    encoder_out: Tensor  # (B, S, E)


# ============================================================================================
# Relative positions and masks
# ============================================================================================


def relative_position_bucket(
    query_minus_key: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's bucket of each relative position ``q - k`` (positive: the key is in the past).

    One-sided buckets (``bidirectional=False``) clamp keys in the future to distance 0, which
    only a causal stack may do. Bidirectional buckets give keys in the future the upper half of
    the table. In each half, distances below half the half are exact, larger ones logarithmic up
    to ``max_distance``. The float operations follow the seed's order so buckets agree exactly.
    """
    bucket = torch.zeros_like(query_minus_key)
    n = query_minus_key
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = n.clamp(min=0)
    max_exact = num_buckets // 2
    # n = 0 would take log(0); those entries are exact anyway, so any finite stand-in does
    n_large = n.clamp(min=1).float()
    large = max_exact + (
        torch.log(n_large / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(n < max_exact, n, large)


@functools.lru_cache(maxsize=64)
def _bucket_grid(
    num_queries: int, num_keys: int, offset: int, bidirectional: bool, num_buckets: int,
    max_distance: int, device: torch.device,
) -> Tensor:
    """(T, K) buckets for queries at positions ``offset .. offset + T - 1`` over keys
    ``0 .. K - 1`` (cached: every step asks for the same few; callers never write to it)."""
    q = torch.arange(offset, offset + num_queries, device=device)
    k = torch.arange(num_keys, device=device)
    return relative_position_bucket(
        q[:, None] - k[None, :], bidirectional=bidirectional, num_buckets=num_buckets,
        max_distance=max_distance,
    )


@functools.lru_cache(maxsize=64)
def _future_keys(num_queries: int, num_keys: int, offset: int, device: torch.device) -> Tensor:
    """(T, K) bool, True where key j is after query ``offset + i`` (blocked in causal stacks)."""
    q = torch.arange(offset, offset + num_queries, device=device)
    return torch.arange(num_keys, device=device)[None, :] > q[:, None]


def masked_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def add_masks(score_bias: Tensor, mask: Tensor | None) -> Tensor:
    """``score_bias + mask`` without letting two blocked entries overflow to -inf (a fully
    blocked row must stay finite and uniform, as in the seed)."""
    if mask is None:
        return score_bias
    return (score_bias + mask).clamp(min=masked_value(mask.dtype))


def padding_mask(query_valid: Tensor | None, key_valid: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Additive (B, 1, T, K) mask blocking pairs where the query or the key is padding (the
    seed's ``query_mask * kv_mask``), or None when nothing is padded."""
    if query_valid is None and key_valid is None:
        return None
    if query_valid is None:
        allowed = key_valid[:, None, None, :]
    elif key_valid is None:
        allowed = query_valid[:, None, :, None]
    else:
        allowed = query_valid[:, None, :, None] & key_valid[:, None, None, :]
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, masked_value(dtype))


class RelativePositionBias(nn.Module):
    """A learned (num_buckets, H) table of score biases indexed by relative-position bucket."""

    def __init__(self, heads: int, *, num_buckets: int, max_distance: int, bidirectional: bool, causal: bool) -> None:
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bidirectional, self.causal = bidirectional, causal
        self.embedding = nn.Embedding(num_buckets, heads)

    def forward(self, num_queries: int, num_keys: int, offset: int = 0) -> Tensor:
        """(1, H, T, K) score bias for queries at ``offset ..`` over keys ``0 ..``, with keys in
        the future blocked when causal. Computed once per forward and shared by all layers."""
        device = self.embedding.weight.device
        buckets = _bucket_grid(
            num_queries, num_keys, offset, self.bidirectional, self.num_buckets,
            self.max_distance, device,
        )
        bias = self.embedding.weight[buckets].permute(2, 0, 1).unsqueeze(0)  # (1, H, T, K)
        if self.causal:
            future = _future_keys(num_queries, num_keys, offset, device)
            bias = bias.masked_fill(future, masked_value(bias.dtype))
        return bias


# ============================================================================================
# Layers
# ============================================================================================


class Attention(nn.Module):
    """Multi-head attention with biased projections (the seed's): queries from ``x``, keys and
    values projected separately (:meth:`project_kv`) so they can be cached."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def split_heads(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def project_kv(self, context: Tensor) -> KeyValue:
        """Keys and values (B, H, K, D) of ``context`` (B, K, E)."""
        k, v = self.to_kv(context).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, KeyValue]:
        """Queries, keys and values (B, H, T, D) of ``x`` for self-attention, in one matmul
        (the weights stay two parameters, as in the seed; concatenating them is cheap)."""
        weight = torch.cat((self.to_q.weight, self.to_kv.weight))
        bias = torch.cat((self.to_q.bias, self.to_kv.bias))
        q, k, v = F.linear(x, weight, bias).chunk(3, dim=-1)
        return self.split_heads(q), (self.split_heads(k), self.split_heads(v))

    def attend(self, q: Tensor, kv: KeyValue, mask: Tensor | None, shape: torch.Size) -> Tensor:
        """Output (``shape`` = (B, T, E)) of queries ``q`` (B, H, T, D) over ``kv``; ``mask`` is
        additive, broadcastable to (B, H, T, K)."""
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)  # (B, H, T, D)
        return self.to_out(out.transpose(1, 2).reshape(shape))

    def forward(self, x: Tensor, kv: KeyValue, mask: Tensor | None = None) -> Tensor:
        """``x`` (B, T, E) attends to ``kv`` (cross-attention)."""
        return self.attend(self.split_heads(self.to_q(x)), kv, mask, x.shape)


class MemformerLayer(nn.Module):
    """Pre-norm residual self-attention, cross-attention and feed-forward (encoder and decoder
    layers have the same parts; they differ in masks and in what they cross-attend to)."""

    def __init__(self, dim: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        cross_kv: KeyValue,
        cross_mask: Tensor | None = None,
        self_prefix: KeyValue | KeyValueCache | None = None,
    ) -> tuple[Tensor, KeyValue]:
        """One layer over ``x`` (B, T, E). ``self_prefix`` holds cached keys and values of earlier
        positions (streaming; a :class:`KeyValueCache` is extended in place); returns the output
        and this call's own self-attention keys and values."""
        q, (k, v) = self.self_attn.project_qkv(self.self_norm(x))
        kv = with_prefix(self_prefix, k, v)
        x = x + self.self_attn.attend(q, kv, self_mask, x.shape)
        x = x + self.cross_attn(self.cross_norm(x), cross_kv, cross_mask)
        x = x + self.ff(self.ff_norm(x))
        return x, (k, v)


class MemoryWriter(nn.Module):
    """Slot attention over ``[slot; encoder outputs]`` (each slot sees only itself among the
    slots), a GRU cell (input: attention output, hidden: old slot), then a pre-norm residual
    feed-forward; repeated ``num_updates`` times."""

    def __init__(self, dim: int, heads: int, ff_mult: int, num_updates: int) -> None:
        super().__init__()
        self.num_updates = num_updates
        self.attn = Attention(dim, heads)
        self.gru = nn.GRUCell(dim, dim)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, slots: Tensor, encoded: Tensor, encoded_valid: Tensor | None = None) -> Tensor:
        """The next slots (B, N, E) from ``slots`` and the segment's ``encoded`` (B, T, E);
        ``encoded_valid`` (B, T) bool masks padding out of what is written."""
        batch, num_slots, width = slots.shape
        dtype = slots.dtype
        other_slots = ~torch.eye(num_slots, dtype=torch.bool, device=slots.device)
        mask = torch.zeros(num_slots, num_slots, dtype=dtype, device=slots.device)
        mask = mask.masked_fill(other_slots, masked_value(dtype))
        mask = F.pad(mask, (0, encoded.shape[1]))[None, None]  # (1, 1, N, N + T)
        if encoded_valid is not None:
            pad = torch.zeros(batch, encoded.shape[1], dtype=dtype, device=slots.device)
            pad = pad.masked_fill(~encoded_valid, masked_value(dtype))
            mask = mask + F.pad(pad, (num_slots, 0))[:, None, None, :]  # (B, 1, N, N + T)
        for _ in range(self.num_updates):
            attended = self.attn(slots, self.attn.project_kv(torch.cat((slots, encoded), dim=1)), mask)
            slots = self.gru(attended.reshape(-1, width), slots.reshape(-1, width))
            slots = slots.view(batch, num_slots, width)
            slots = slots + self.ff(self.ff_norm(slots))
        return slots


# ============================================================================================
# The model
# ============================================================================================


@register("memformer")
class Memformer(MemoryLM):
    """Memformer in one of three modes (see the module docstring).

    The state it returns keeps the autograd graph of the write (so gradients reach the writer
    from later segments). Detach it between optimizer steps (``out.state.detach()``, as the
    trainer does), or train through many segments with :func:`memtx.training.mrbp.mrbp`.
    """

    config_class = MemformerConfig
    state_class = MemformerState
    writes_state_with_parameters = True  # the slot writer

    def __init__(self, config: MemformerConfig) -> None:
        super().__init__(config)
        cfg = config
        causal_encoder = cfg.mode == "lm"
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.encoder_rel_pos = RelativePositionBias(
            cfg.heads, num_buckets=cfg.num_buckets, max_distance=cfg.max_distance,
            bidirectional=not causal_encoder and cfg.relative_buckets == "bidirectional",
            causal=causal_encoder,
        )
        self.encoder_layers = nn.ModuleList(
            MemformerLayer(cfg.dim, cfg.heads, cfg.ff_mult) for _ in range(cfg.depth)
        )
        self.encoder_norm = nn.LayerNorm(cfg.dim)
        # the seed draws the initial slots from N(0, 1)
        self.memory_slots = nn.Parameter(torch.randn(cfg.num_memory_slots, cfg.dim))
        self.writer = MemoryWriter(cfg.dim, cfg.mem_update_heads, cfg.ff_mult, cfg.num_mem_updates)
        if cfg.mode == "lm":
            self.head = nn.Linear(cfg.dim, cfg.vocab_size)
        if cfg.mode == "encoder_decoder":
            self.decoder_embed = nn.Embedding(cfg.target_vocab_size, cfg.dim)
            # the seed's decoder uses T5's bidirectional buckets under its causal mask: only the
            # half for past keys is ever read; kept for parity
            self.decoder_rel_pos = RelativePositionBias(
                cfg.heads, num_buckets=cfg.num_buckets, max_distance=cfg.max_distance,
                bidirectional=True, causal=True,
            )
            self.decoder_layers = nn.ModuleList(
                MemformerLayer(cfg.dim, cfg.heads, cfg.ff_mult)
                for _ in range(cfg.decoder_depth or cfg.depth)
            )
            self.decoder_norm = nn.LayerNorm(cfg.dim)
            self.decoder_head = nn.Linear(cfg.dim, cfg.target_vocab_size)

    # -- state ---------------------------------------------------------------------------------
    def init_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> MemformerState:
        cfg = self.config
        device = self.device if device is None else device
        return MemformerState(
            slots=torch.zeros(batch_size, cfg.num_memory_slots, cfg.dim, device=device, dtype=dtype or self.dtype),
            initialised=torch.zeros(batch_size, dtype=torch.bool, device=device),
        )

    def read_slots(self, state: MemformerState) -> Tensor:
        """(B, N, E) slots to read: the state's, or the learned initial slots where empty."""
        learned = self.memory_slots.to(state.slots.dtype).expand_as(state.slots)
        return torch.where(state.initialised[:, None, None], state.slots, learned)

    def write(self, slots: Tensor, encoded: Tensor, encoded_valid: Tensor | None = None) -> MemformerState:
        """The state after a segment: ``slots`` (what the segment read) updated from the
        segment's final encoder outputs ``encoded`` (B, T, E). Keeps the autograd graph."""
        new = self.writer(slots, encoded, encoded_valid)
        ones = torch.ones(new.shape[0], dtype=torch.bool, device=new.device)
        return MemformerState(slots=new, initialised=ones)

    # -- encoder -------------------------------------------------------------------------------
    def run_encoder(
        self,
        input_ids: Tensor,
        slots: Tensor,
        src_mask: Tensor | None = None,
        kv_cache: list[KeyValue] | list[KeyValueCache] | None = None,
        offset: int = 0,
        cross_kv: list[KeyValue] | None = None,
    ) -> tuple[Tensor, list[KeyValue]]:
        """Final-normed encoder outputs (B, T, E) of ``input_ids`` at positions ``offset ..``
        reading ``slots``, and each layer's self-attention keys and values of these positions.
        ``kv_cache`` / ``cross_kv`` (causal streaming) are the earlier positions' keys and values
        and the slots' projections."""
        x = self.embed(input_ids)
        length = input_ids.shape[1]
        self_mask = self.encoder_rel_pos(length, offset + length, offset).to(x.dtype)
        self_mask = add_masks(self_mask, padding_mask(src_mask, src_mask, x.dtype))
        new_kvs = []
        for i, layer in enumerate(self.encoder_layers):
            memory_kv = cross_kv[i] if cross_kv is not None else layer.cross_attn.project_kv(slots)
            prefix = kv_cache[i] if kv_cache is not None else None
            x, kv = layer(x, self_mask, memory_kv, self_prefix=prefix)
            new_kvs.append(kv)
        return self.encoder_norm(x), new_kvs

    def encode(
        self,
        src: Tensor,
        state: MemformerState | None = None,
        src_mask: Tensor | None = None,
    ) -> tuple[Tensor, MemformerState]:
        """Encoder outputs (B, S, E) of a source segment and the memory after it.

        ``src_mask`` (B, S) bool is False at padding: padded positions are neither attended to
        nor written into memory. In ``lm`` mode the encoder is causal.
        """
        self.check_input_ids(src)
        state = self._checked_state(state, src.shape[0], src.device)
        self._check_mask(src_mask, src, "src_mask")
        slots = self.read_slots(state)
        encoded, _ = self.run_encoder(src, slots, src_mask)
        return encoded, self.write(slots, encoded, src_mask)

    # -- language model (mode "lm") ------------------------------------------------------------
    def forward_segment(self, input_ids: Tensor, state: MemformerState) -> tuple[Tensor, MemformerState, Tensor]:
        if self.config.mode != "lm":
            raise InputError(
                f"model(input_ids) is the language-model contract, but this Memformer has "
                f"mode={self.config.mode!r}: use model.seq2seq(src, tgt) or model.encode(src), "
                "or build it with mode='lm'"
            )
        slots = self.read_slots(state)
        encoded, _ = self.run_encoder(input_ids, slots)
        logits = self.head(encoded)
        aux_loss = torch.zeros((), device=input_ids.device, dtype=torch.float32)
        with self.state_update():
            next_state = self.write(slots, encoded)
        return logits, next_state, aux_loss

    def stream(self, state: MemformerState | None = None, batch_size: int = 1) -> "MemformerStream":
        if self.config.mode != "lm":
            raise InputError(
                f"streaming generation needs mode='lm' (this model has mode={self.config.mode!r}); "
                "use model.generate_seq2seq(src, ...) in encoder_decoder mode"
            )
        return MemformerStream(self, state, batch_size)

    # -- encoder-decoder (mode "encoder_decoder") ----------------------------------------------
    def run_decoder(
        self,
        tgt: Tensor,
        cross_kv: list[KeyValue],
        cross_mask: Tensor | None,
        tgt_mask: Tensor | None = None,
        kv_cache: list[KeyValue] | list[KeyValueCache] | None = None,
        offset: int = 0,
    ) -> tuple[Tensor, list[KeyValue]]:
        """Logits (B, T, V) of target tokens at positions ``offset ..`` and each layer's new
        self-attention keys and values; ``cross_kv`` are the encoder outputs' projections."""
        x = self.decoder_embed(tgt)
        length = tgt.shape[1]
        self_mask = self.decoder_rel_pos(length, offset + length, offset).to(x.dtype)
        self_mask = add_masks(self_mask, padding_mask(tgt_mask, tgt_mask, x.dtype))
        new_kvs = []
        for i, layer in enumerate(self.decoder_layers):
            prefix = kv_cache[i] if kv_cache is not None else None
            x, kv = layer(x, self_mask, cross_kv[i], cross_mask, self_prefix=prefix)
            new_kvs.append(kv)
        return self.decoder_head(self.decoder_norm(x)), new_kvs

    def seq2seq(
        self,
        src: Tensor,
        tgt: Tensor,
        state: MemformerState | None = None,
        *,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> Seq2SeqOutput:
        """Encode ``src`` (B, S) reading the memory, decode ``tgt`` (B, T) with teacher forcing.

        ``logits[:, t]`` predicts the token after ``tgt[:, t]``; pass ``targets`` (usually
        ``tgt`` shifted left, ``-100`` where nothing is scored) for the loss. Masks are bool,
        False at padding. The seed's ``Memformer(src, tgt)`` equals ``tgt_in, targets =
        tgt[:, :-1], tgt[:, 1:]`` here.
        """
        self._require_mode("encoder_decoder", "seq2seq")
        self._check_target_ids(tgt, "tgt")
        self._check_mask(tgt_mask, tgt, "tgt_mask")
        if targets is not None:
            if targets.shape != tgt.shape:
                raise InputError(
                    f"targets must have the shape of tgt {tuple(tgt.shape)}, got {tuple(targets.shape)}"
                )
            self._check_target_ids(targets, "targets", allow_ignore=True)
        encoded, next_state = self.encode(src, state, src_mask)
        cross_kv = [layer.cross_attn.project_kv(encoded) for layer in self.decoder_layers]
        cross_mask = padding_mask(tgt_mask, src_mask, encoded.dtype)
        logits, _ = self.run_decoder(tgt, cross_kv, cross_mask, tgt_mask)
        loss = None if targets is None else lm_loss(logits, targets)
        return Seq2SeqOutput(logits=logits, state=next_state, loss=loss, encoder_out=encoded)

    @torch.no_grad()
    def generate_seq2seq(
        self,
        src: Tensor,
        start_ids: Tensor,
        max_new_tokens: int,
        state: MemformerState | None = None,
        *,
        src_mask: Tensor | None = None,
        eos_token: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, MemformerState]:
        """Decode a target for ``src`` (B, S), starting from ``start_ids`` (B, t0), with a
        key/value cache; returns (B, <= max_new_tokens) new tokens and the memory after ``src``.

        Stops early once every row has produced ``eos_token``. ``start_ids`` plus the new tokens
        must fit in ``seq_len``. Runs in eval mode and restores the model's mode.
        """
        self._require_mode("encoder_decoder", "generate_seq2seq")
        _check_sampling(temperature, top_k, top_p, max_new_tokens)
        self._check_target_ids(start_ids, "start_ids")
        if start_ids.shape[0] != src.shape[0]:
            raise InputError(f"start_ids has {start_ids.shape[0]} rows but src has {src.shape[0]}")
        if start_ids.shape[1] + max_new_tokens > self.config.seq_len:
            raise InputError(
                f"start_ids ({start_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceed "
                f"seq_len={self.config.seq_len}, the longest target segment"
            )
        was_training = self.training
        self.eval()
        try:
            encoded, next_state = self.encode(src, state, src_mask)
            cross_kv = [layer.cross_attn.project_kv(encoded) for layer in self.decoder_layers]
            cross_mask = padding_mask(None, src_mask, encoded.dtype)
            logits, kvs = self.run_decoder(start_ids, cross_kv, cross_mask)
            position = start_ids.shape[1]
            cache = [KeyValueCache(position + max_new_tokens, kv) for kv in kvs]
            new_tokens: list[Tensor] = []
            done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
            for i in range(max_new_tokens):
                token = sample_next(
                    logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                    generator=generator,
                )
                new_tokens.append(token)
                if eos_token is not None:
                    done |= token == eos_token
                    if bool(done.all()):
                        break
                if i + 1 < max_new_tokens:
                    # the decoder layers append the token's keys and values to the caches
                    logits, _ = self.run_decoder(token[:, None], cross_kv, cross_mask,
                                                 kv_cache=cache, offset=position)
                    position += 1
        finally:
            self.train(was_training)
        if not new_tokens:
            return start_ids.new_zeros(start_ids.shape[0], 0), next_state
        return torch.stack(new_tokens, dim=1), next_state

    # -- checks --------------------------------------------------------------------------------
    def _require_mode(self, mode: str, method: str) -> None:
        if self.config.mode != mode:
            raise InputError(
                f"model.{method}() needs mode={mode!r}, but this Memformer has "
                f"mode={self.config.mode!r}"
            )

    def _checked_state(self, state: MemformerState | None, batch_size: int, device: torch.device) -> MemformerState:
        if state is None:
            return self.init_state(batch_size, device=device)
        self.check_state(state, batch_size, device)
        return state

    def _check_mask(self, mask: Tensor | None, ids: Tensor, name: str) -> None:
        if mask is None:
            return
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise InputError(
                f"{name} must be a bool tensor (True at real tokens, False at padding), got "
                f"{kind}; use {name}.bool()"
            )
        if mask.shape != ids.shape:
            raise InputError(
                f"{name} must have the shape of its token ids {tuple(ids.shape)}, got "
                f"{tuple(mask.shape)}"
            )
        if mask.device != ids.device:
            raise InputError(f"{name} is on {mask.device} but the token ids are on {ids.device}")

    def _check_target_ids(self, ids: Tensor, name: str, allow_ignore: bool = False) -> None:
        vocab = self.config.target_vocab_size
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or not ids.shape[1]:
            raise InputError(f"{name} must be integer token ids of shape (batch, time), time >= 1")
        if ids.shape[1] > self.config.seq_len:
            raise InputError(
                f"{name} has {ids.shape[1]} tokens, more than seq_len={self.config.seq_len}"
            )
        values = ids[ids != IGNORE_INDEX] if allow_ignore else ids
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= vocab):
            raise InputError(f"{name} must hold token ids in [0, {vocab})")


class MemformerStream(Stream):
    """Streaming decoder for ``lm`` mode: a key/value cache of the current segment per layer,
    the slots' cross-attention keys and values projected once per segment, and the segment's
    encoder outputs kept so the memory is written at the segment boundary exactly as a training
    forward pass writes it."""

    model: Memformer

    def __init__(self, model: Memformer, state: MemformerState | None, batch_size: int) -> None:
        super().__init__(model, state, batch_size)
        self._start_segment()

    def _start_segment(self) -> None:
        self._slots = self.model.read_slots(self.state)
        self._cross_kv = [layer.cross_attn.project_kv(self._slots) for layer in self.model.encoder_layers]
        seq_len = self.model.config.seq_len
        self._kv = [KeyValueCache(seq_len) for _ in self.model.encoder_layers]
        self._encoded: list[Tensor] = []

    def _advance(self, input_ids: Tensor) -> Tensor:
        # the encoder layers append the new positions' keys and values to the caches
        encoded, _ = self.model.run_encoder(
            input_ids, self._slots, kv_cache=self._kv, offset=self.partial_len,
            cross_kv=self._cross_kv,
        )
        self._encoded.append(encoded)
        return self.model.head(encoded)

    def _commit(self) -> None:
        self.state = self.model.write(self._slots, torch.cat(self._encoded, dim=1))
        self._start_segment()


# ============================================================================================
# Import from the reference package (memformer==0.3.1)
# ============================================================================================


def _copy_layers(dst: nn.ModuleList, src_layers: nn.ModuleList) -> None:
    weights: dict[str, Tensor] = {}
    for i, (self_attn, cross_attn, ff) in enumerate(src_layers):
        parts = {"self": self_attn.fn, "cross": cross_attn.fn}
        for name, prenorm in parts.items():
            weights.update({f"{i}.{name}_norm.{k}": v for k, v in prenorm.norm.state_dict().items()})
            weights.update({f"{i}.{name}_attn.{k}": v for k, v in prenorm.fn.state_dict().items()})
        weights.update({f"{i}.ff_norm.{k}": v for k, v in ff.fn.norm.state_dict().items()})
        weights.update(_feedforward_weights(ff.fn.fn, f"{i}.ff."))
    dst.load_state_dict(weights)


def _feedforward_weights(seed_ff: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    first, last = seed_ff.net[0], seed_ff.net[2]
    return {prefix + "w1.weight": first.weight, prefix + "w1.bias": first.bias,
            prefix + "w2.weight": last.weight, prefix + "w2.bias": last.bias}


@register_converter("memformer.memformer.Memformer")
@torch.no_grad()
def from_seed(reference: nn.Module) -> Memformer:
    """A memtx Memformer with the weights of a ``memformer.Memformer`` (0.3.1).

    The mode is ``encoder_decoder`` (or ``encoder`` for ``encoder_only=True``) with
    ``relative_buckets="seed"``, so outputs equal the reference's; build a model with
    ``relative_buckets="bidirectional"`` and load these weights to fine-tune with the fix.
    """
    encoder = reference.encoder
    enc_blocks = encoder.layer_blocks
    decoder = reference.decoder.net if reference.decoder is not None else None
    heads = enc_blocks.layers[0][0].fn.fn.heads
    rel = enc_blocks.rel_pos_emb
    seq_len = encoder.max_seq_len
    values = dict(
        mode="encoder" if decoder is None else "encoder_decoder",
        vocab_size=encoder.token_emb.num_embeddings,
        dim=reference.memory_slots.shape[1],
        depth=len(enc_blocks.layers),
        heads=heads,
        num_memory_slots=reference.num_mem,
        num_mem_updates=reference.num_mem_updates,
        mem_update_heads=reference.mem_updater.heads,
        ff_mult=enc_blocks.layers[0][2].fn.fn.net[0].out_features // reference.memory_slots.shape[1],
        num_buckets=rel.num_buckets,
        max_distance=rel.max_distance,
        relative_buckets="seed",
    )
    if decoder is not None:
        dec_heads = decoder.layer_blocks.layers[0][0].fn.fn.heads
        if dec_heads != heads:
            raise InputError(
                f"memtx's Memformer shares heads between encoder ({heads}) and decoder "
                f"({dec_heads}); this reference model cannot be converted"
            )
        seq_len = max(seq_len, decoder.max_seq_len)
        values.update(
            decoder_depth=len(decoder.layer_blocks.layers),
            decoder_vocab_size=decoder.token_emb.num_embeddings,
        )
    model = Memformer(MemformerConfig(seq_len=seq_len, **values))
    model.to(reference.memory_slots.dtype)
    model.embed.load_state_dict(encoder.token_emb.state_dict())
    model.encoder_rel_pos.embedding.load_state_dict(rel.relative_attention_bias.state_dict())
    _copy_layers(model.encoder_layers, enc_blocks.layers)
    model.encoder_norm.load_state_dict(encoder.norm.state_dict())
    model.memory_slots.copy_(reference.memory_slots)
    model.writer.attn.load_state_dict(reference.mem_updater.state_dict())
    model.writer.gru.load_state_dict(reference.gru.state_dict())
    model.writer.ff_norm.load_state_dict(reference.mem_ff.fn.norm.state_dict())
    model.writer.ff.load_state_dict(_feedforward_weights(reference.mem_ff.fn.fn))
    if decoder is not None:
        model.decoder_embed.load_state_dict(decoder.token_emb.state_dict())
        model.decoder_rel_pos.embedding.load_state_dict(
            decoder.layer_blocks.rel_pos_emb.relative_attention_bias.state_dict()
        )
        _copy_layers(model.decoder_layers, decoder.layer_blocks.layers)
        model.decoder_norm.load_state_dict(decoder.norm.state_dict())
        model.decoder_head.load_state_dict(decoder.to_logits.state_dict())
    return model.to(reference.memory_slots.device).train(reference.training)


__all__ = [
    "Memformer",
    "MemformerConfig",
    "MemformerState",
    "MemformerStream",
    "Seq2SeqOutput",
    "from_seed",
    "relative_position_bucket",
]
