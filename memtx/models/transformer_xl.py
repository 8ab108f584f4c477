"""Transformer-XL (Dai et al. 2019): segment recurrence with relative positional attention.

Each layer keeps the inputs it saw at the last ``mem_len`` positions (with a stop-gradient: the
memory is a constant to the next segment's backward pass) and its queries attend over
``[memory; segment]`` with the relative-position scores of the paper. This is the baseline every
other memtx architecture grows from.

memtx's variant is pre-norm (LayerNorm before attention and feed-forward, and before the output
head), which trains stably without warm-up tricks at small scale; the memory stores the
un-normalised layer inputs and is normalised by the layer that reads it.

Shape legend: B batch, T segment, M memory, K = M + T keys, L layers, D model width,
H heads, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memtx.config import ModelConfig
from memtx.layers.init import init_gpt2_weights, scale_residual_projections
from memtx.generation import Stream
from memtx.layers.attention import KeyValue, KeyValueCache
from memtx.layers.blocks import RelativeMemoryBlock
from memtx.modeling import MemoryLM
from memtx.ops.position import relative_distances, sinusoid
from memtx.registry import register
from memtx.state import FifoMemory, append_to_fifo


@dataclass(kw_only=True)
class TransformerXLConfig(ModelConfig):
    """Transformer-XL hyper-parameters (beyond :class:`memtx.config.ModelConfig`).

    Attributes:
        mem_len: past positions each layer keeps in memory; 0 disables the memory.
        head_dim: width of each attention head (default ``dim // heads``).
        ff_mult: feed-forward hidden width as a multiple of ``dim``.
        dropout: dropout on embeddings, position embeddings and residual branches.
        attn_dropout: dropout on attention weights.
        tie_embeddings: use the input embedding matrix as the output projection.
        checkpoint_attention: rebuild each layer's (B, H, T, M + T) attention weights in the
            backward pass instead of keeping them (same results; less memory with long
            memories, for one more score computation per layer in backward).
    """

    mem_len: int = 256
    head_dim: int | None = None
    ff_mult: int = 4
    dropout: float = 0.0
    attn_dropout: float = 0.0
    tie_embeddings: bool = True
    checkpoint_attention: bool = False

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
        self.require(self.mem_len >= 0, "mem_len", "must be >= 0 (0 disables the memory)")
        self.require(self.ff_mult >= 1, "ff_mult", "must be at least 1")
        self.require_probabilities("dropout", "attn_dropout")


@register("transformer_xl")
class TransformerXL(MemoryLM):
    """Transformer-XL language model under the memtx contract (see module docstring)."""

    config_class = TransformerXLConfig
    state_class = FifoMemory

    def __init__(self, config: TransformerXLConfig) -> None:
        super().__init__(config)
        cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            RelativeMemoryBlock(
                cfg.dim, cfg.heads, cfg.head_dim, ff_mult=cfg.ff_mult,
                dropout=cfg.dropout, attn_dropout=cfg.attn_dropout,
                checkpoint_attention=cfg.checkpoint_attention,
            )
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
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
    ) -> FifoMemory:
        cfg = self.config
        device = self.device if device is None else device
        return FifoMemory(
            mem=torch.zeros(cfg.depth, batch_size, 0, cfg.dim, device=device, dtype=dtype or self.dtype),
            valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
        )

    def state_limits(self) -> dict[str, int]:
        return {"mem": self.config.mem_len}

    def append_memory(self, state: FifoMemory, hiddens: Tensor) -> FifoMemory:
        """The memory after a segment whose layer inputs are ``hiddens`` (L, B, T, D): the last
        ``mem_len`` positions of ``[memory; segment]``, with a stop-gradient."""
        mem, valid = append_to_fifo(state.mem, state.valid, hiddens.detach().to(state.mem.dtype),
                                    self.config.mem_len)
        return FifoMemory(mem=mem, valid=valid)

    # -- forward -------------------------------------------------------------------------------
    def position_embeddings(self, num_keys: int, device: torch.device) -> Tensor:
        """(K, D) sinusoids of the distances K-1, ..., 0."""
        return sinusoid(relative_distances(num_keys, device), self.config.dim).to(self.dtype)

    def run_blocks(
        self,
        x: Tensor,
        kv_prefixes: list[KeyValue | None],
        positions: list[Tensor],
        key_valid: Tensor | None,
    ) -> tuple[Tensor, list[KeyValue], Tensor]:
        """Run every block; returns the final hidden states, each layer's new keys and values,
        and the layer inputs (L, B, T, D) that become memory."""
        layer_inputs, new_kvs = [], []
        for block, kv_prefix, r in zip(self.blocks, kv_prefixes, positions):
            layer_inputs.append(x)
            x, kv = block(x, kv_prefix, r, key_valid)
            new_kvs.append(kv)
        return x, new_kvs, torch.stack(layer_inputs)

    def forward_segment(self, input_ids: Tensor, state: FifoMemory) -> tuple[Tensor, FifoMemory, Tensor]:
        batch, length = input_ids.shape
        mem_len = state.mem.shape[2]
        x = self.dropout(self.embed(input_ids))
        pos_emb = self.dropout(self.position_embeddings(mem_len + length, x.device))
        positions = [block.attn.project_positions(pos_emb) for block in self.blocks]
        kv_prefixes = [block.memory_kv(state.mem[i]) if mem_len else None
                       for i, block in enumerate(self.blocks)]
        key_valid = key_validity(state.valid, length)
        x, _, layer_inputs = self.run_blocks(x, kv_prefixes, positions, key_valid)
        logits = self.head(self.norm(x))
        aux_loss = torch.zeros((), device=x.device, dtype=torch.float32)
        return logits, self.append_memory(state, layer_inputs), aux_loss

    def stream(self, state: FifoMemory | None = None, batch_size: int = 1) -> "TransformerXLStream":
        return TransformerXLStream(self, state, batch_size)


def key_validity(mem_valid: Tensor, length: int) -> Tensor | None:
    """(B, M + T) validity of ``[memory; segment]`` keys, or None when every key is valid."""
    if bool(mem_valid.all()):
        return None
    ones = torch.ones(mem_valid.shape[0], length, dtype=torch.bool, device=mem_valid.device)
    return torch.cat((mem_valid, ones), dim=1)


class TransformerXLStream(Stream):
    """Streaming decoder with a key/value cache of ``[memory; partial segment]`` per layer.

    Per-token cost is bounded by ``mem_len + seq_len`` keys whatever the number of tokens
    generated. At a segment boundary the segment's layer inputs are committed to memory with
    :meth:`TransformerXL.append_memory`, exactly as a training forward pass does.
    """

    model: TransformerXL

    def __init__(self, model: TransformerXL, state: FifoMemory | None, batch_size: int) -> None:
        super().__init__(model, state, batch_size)
        cfg = model.config
        max_keys = cfg.mem_len + cfg.seq_len
        pos_emb = model.position_embeddings(max_keys, model.device)
        # projected embeddings of distances max_keys-1 .. 0; slicing the tail gives K-1 .. 0
        self._positions = [block.attn.project_positions(pos_emb) for block in model.blocks]
        self._start_segment()

    def _start_segment(self) -> None:
        mem = self.state.mem
        capacity = mem.shape[2] + self.model.config.seq_len
        self._kv = [KeyValueCache(capacity, block.memory_kv(mem[i]) if mem.shape[2] else None)
                    for i, block in enumerate(self.model.blocks)]
        self._layer_inputs: list[list[Tensor]] = [[] for _ in self.model.blocks]

    def _commit(self) -> None:
        hiddens = torch.stack([torch.cat(chunks, dim=1) for chunks in self._layer_inputs])
        self.state = self.model.append_memory(self.state, hiddens)
        self._start_segment()

    def _advance(self, input_ids: Tensor) -> Tensor:
        model = self.model
        length = input_ids.shape[1]
        num_keys = self.state.mem.shape[2] + self.partial_len + length
        x = model.embed(input_ids)
        key_valid = key_validity(self.state.valid, self.partial_len + length)
        for i, block in enumerate(model.blocks):
            self._layer_inputs[i].append(x)
            r = self._positions[i][:, -num_keys:]
            x, _ = block(x, self._kv[i], r, key_valid)  # appends this chunk's keys and values
        return model.head(model.norm(x))
