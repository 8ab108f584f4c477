"""Streaming generation.

A :class:`Stream` feeds tokens to a model a few (or one) at a time. It keeps the committed memory
state and the current partial segment; when a segment is full it commits it to memory exactly as
a training forward pass over that segment would, so a stream of tokens sees the same logits as
feeding the same tokens segment by segment with the state carried. The per-token cost is bounded
by the segment and memory lengths, not by how many tokens were generated.

:func:`generate` samples from a stream. Shape legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from memtx.errors import InputError

if TYPE_CHECKING:
    from memtx.modeling import MemoryLM
    from memtx.state import State


class Stream:
    """Base of streaming decoders; subclasses implement :meth:`_advance` and :meth:`_commit`.

    Attributes:
        state: the memory committed so far (all full segments before the current one).
        partial_len: tokens of the current segment already fed.
    """

    def __init__(self, model: "MemoryLM", state: "State | None", batch_size: int) -> None:
        self.model = model
        if state is None:
            state = model.init_state(batch_size)
        else:
            model.check_state(state, batch_size, model.device)
        self.state = state
        self.batch_size = batch_size
        self.partial_len = 0

    @torch.no_grad()
    def feed(self, input_ids: Tensor) -> Tensor:
        """Feed (B, T) tokens (any T) and return their logits (B, T, V)."""
        seq_len = self.model.config.seq_len
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise InputError(
                f"expected token ids of shape ({self.batch_size}, T), got {tuple(input_ids.shape)}"
            )
        outputs = []
        pos = 0
        while pos < input_ids.shape[1]:
            if self.partial_len == seq_len:
                self._commit()
                self.partial_len = 0
            take = min(input_ids.shape[1] - pos, seq_len - self.partial_len)
            chunk = input_ids[:, pos : pos + take]
            self.model.check_input_ids(chunk)
            outputs.append(self._advance(chunk))
            self.partial_len += take
            pos += take
        return torch.cat(outputs, dim=1)

    def _advance(self, input_ids: Tensor) -> Tensor:
        """Logits of ``input_ids`` appended to the current partial segment (which fits)."""
        raise NotImplementedError

    def _commit(self) -> None:
        """Commit the full current segment to ``self.state``."""
        raise NotImplementedError


class RecomputeStream(Stream):
    """Generic stream: recomputes the current partial segment from the committed state for
    every call. Correct for any model; cost per token grows with the segment, not the stream."""

    def __init__(self, model: "MemoryLM", state: "State | None", batch_size: int) -> None:
        super().__init__(model, state, batch_size)
        self._segment: Tensor | None = None
        self._segment_state: "State | None" = None

    def _advance(self, input_ids: Tensor) -> Tensor:
        segment = input_ids if self._segment is None else torch.cat((self._segment, input_ids), 1)
        out = self.model(segment, self.state)
        self._segment, self._segment_state = segment, out.state
        return out.logits[:, -input_ids.shape[1] :]

    def _commit(self) -> None:
        assert self._segment_state is not None
        self.state = self._segment_state
        self._segment = self._segment_state = None


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample one token per row from (B, V) logits; ``temperature=0`` picks the argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already cover top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1] or None, got {top_p}")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


@torch.no_grad()
def generate(
    model: "MemoryLM",
    prompt_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    state: "State | None" = None,
    generator: torch.Generator | None = None,
    callback: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Continue ``prompt_ids`` (B, T) by ``max_new_tokens`` sampled tokens.

    The prompt is fed in segments, then tokens one at a time through :meth:`MemoryLM.stream`,
    so the cost per token does not grow with the length generated. ``callback(token_ids)`` is
    called with each new (B,) column as soon as it is sampled.

    Args:
        model: any memtx model; it runs in eval mode and is restored to its mode afterwards.
        prompt_ids: (B, T) token ids with T >= 1 (any length: it is split into segments).
        max_new_tokens: number of tokens to generate.
        temperature: softmax temperature; 0 means greedy decoding.
        top_k: keep only the k most likely tokens.
        top_p: nucleus sampling: keep the smallest set of tokens with probability >= top_p.
        state: memory to start from (e.g. the state after an earlier document); default empty.
        generator: a ``torch.Generator`` for reproducible sampling.

    Returns:
        (B, max_new_tokens) LongTensor of the new tokens.
    """
    _check_sampling(temperature, top_k, top_p, max_new_tokens)
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise InputError(
            f"prompt_ids must have shape (batch, T) with T >= 1, got {tuple(prompt_ids.shape)}"
        )
    was_training = model.training
    model.eval()
    try:
        stream = model.stream(state, prompt_ids.shape[0])
        logits = stream.feed(prompt_ids.to(model.device))[:, -1]
        new_tokens = []
        for i in range(max_new_tokens):
            token = sample_next(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            new_tokens.append(token)
            if callback is not None:
                callback(token)
            if i + 1 < max_new_tokens:
                logits = stream.feed(token[:, None])[:, -1]
    finally:
        model.train(was_training)
    if not new_tokens:
        return torch.zeros(prompt_ids.shape[0], 0, dtype=torch.long, device=prompt_ids.device)
    return torch.stack(new_tokens, dim=1)
