"""Transformer-XL style stream batching over a 1-D token sequence.

Training (:class:`StreamBatcher`): the split is cut into ``world_size * batch_size`` contiguous
streams of equal length ``S = len(data) // (world_size * batch_size)`` (the remainder at the end
of the split is dropped). Rank ``r`` owns streams ``[r * batch_size, (r + 1) * batch_size)``, and
row ``b`` of every batch comes from the same stream, so a memory carried for row ``b`` always
belongs to stream ``b``. Step ``i`` of an epoch yields::

    inputs[b]  = stream_b[i * T     : i * T + T]
    targets[b] = stream_b[i * T + 1 : i * T + T + 1]

so a stream of length ``S`` gives ``(S - 1) // T`` segments per epoch (the last few tokens of each
stream that do not fill a segment are not used).

Epoch wraps: iterating forever restarts every stream at its beginning and increments ``epoch``.
The memory carried for a row at that point holds the *end* of its stream, which does not precede
the new segment, so **the trainer must reset its memory whenever ``batch.reset_memory`` is True**
(the first batch of every epoch, the very first batch included).

Evaluation (:func:`iter_segments`): covers every target of a split exactly once, including a final
partial segment. The first token of the split is never a target (nothing precedes it), so a split
of ``N`` tokens yields exactly ``N - 1`` scored targets; padding targets are ``IGNORE_INDEX``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Union

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX",
    "StreamBatch",
    "StreamBatcher",
    "iter_segments",
]

IGNORE_INDEX = -100
# Input token padding ragged evaluation rows; its target is IGNORE_INDEX, so it is never scored.
PAD_INPUT_TOKEN = 0

TokenSource = Union[np.ndarray, torch.Tensor]


class StreamBatch(tuple):
    """``(inputs, targets)`` LongTensors of shape ``(batch, length)`` plus stream bookkeeping.

    Unpacks like a plain pair (``inputs, targets = batch``); the extra attributes are:

    * ``reset_memory``: True when this batch starts the streams afresh (first batch of an epoch),
      so any memory carried from the previous batch must be dropped before using it;
    * ``epoch`` and ``position``: which epoch and which segment index within it this batch is.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    reset_memory: bool
    epoch: int
    position: int

    def __new__(
        cls,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        reset_memory: bool,
        epoch: int,
        position: int,
    ) -> StreamBatch:
        batch = super().__new__(cls, (inputs, targets))
        batch.inputs = inputs
        batch.targets = targets
        batch.reset_memory = reset_memory
        batch.epoch = epoch
        batch.position = position
        return batch

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # The keyword-only __new__ defeats tuple's default pickling (needed by DataLoader workers).
        return (
            _rebuild_stream_batch,
            (self.inputs, self.targets, self.reset_memory, self.epoch, self.position),
        )

    def __repr__(self) -> str:
        return (
            f"StreamBatch(shape={tuple(self.inputs.shape)}, reset_memory={self.reset_memory}, "
            f"epoch={self.epoch}, position={self.position})"
        )


def _rebuild_stream_batch(
    inputs: torch.Tensor, targets: torch.Tensor, reset_memory: bool, epoch: int, position: int
) -> StreamBatch:
    return StreamBatch(inputs, targets, reset_memory=reset_memory, epoch=epoch, position=position)


class StreamBatcher:
    """Contiguous-stream batches with a resumable cursor (see the module doc for the layout).

    Args:
        data: 1-D tokens: a ``ByteSplit``/``ByteCorpus`` (anything with ``.numpy()``), a numpy
            integer array (a memory map stays a memory map) or an integer tensor.
        batch_size: streams (rows) per rank.
        seq_len: tokens per segment (``T``).
        rank, world_size: this process's rank among ``world_size`` data-parallel ranks.

    Iterating the batcher goes on forever (wrapping epochs); :meth:`iter_epoch` stops at the end of
    the current epoch. ``len(batcher)`` is the number of segments per epoch. The cursor is the
    same on every rank, so one rank's :meth:`state_dict` can be loaded by all of them.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_positive_int("batch_size", batch_size)
        _check_positive_int("seq_len", seq_len)
        _check_positive_int("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        self._tokens = _as_token_source(data)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size

        num_streams = world_size * batch_size
        total = len(self._tokens)
        self.stream_length = total // num_streams
        if self.stream_length < seq_len + 1:
            needed = num_streams * (seq_len + 1)
            raise ValueError(
                f"data of {total} tokens is too small for {num_streams} streams "
                f"(world_size={world_size} x batch_size={batch_size}) of at least one segment "
                f"of seq_len={seq_len} plus 1 target token: need at least {needed} tokens; "
                f"use a smaller batch_size or seq_len"
            )
        self.num_segments = (self.stream_length - 1) // seq_len
        first_stream = rank * batch_size
        self.stream_starts: list[int] = [
            (first_stream + row) * self.stream_length for row in range(batch_size)
        ]
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.num_segments

    def batch_at(self, position: int, *, epoch: int | None = None) -> StreamBatch:
        """The batch for segment ``position`` of an epoch, without moving the cursor."""
        if not 0 <= position < self.num_segments:
            raise IndexError(f"position {position} is outside [0, {self.num_segments})")
        offset = position * self.seq_len
        windows = _gather_windows(
            self._tokens, [start + offset for start in self.stream_starts], self.seq_len + 1
        )
        return StreamBatch(
            windows[:, :-1],
            windows[:, 1:],
            reset_memory=position == 0,
            epoch=self.epoch if epoch is None else epoch,
            position=position,
        )

    def next_batch(self) -> StreamBatch:
        """The batch at the cursor; advances it, wrapping to the next epoch after the last one."""
        batch = self.batch_at(self.position)
        self.position += 1
        if self.position == self.num_segments:
            self.position = 0
            self.epoch += 1
        return batch

    def __iter__(self) -> Iterator[StreamBatch]:
        while True:
            yield self.next_batch()

    def iter_epoch(self) -> Iterator[StreamBatch]:
        """Batches from the cursor to the end of the current epoch (a full epoch from position 0).

        Afterwards the cursor is at the start of the next epoch.
        """
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """The cursor plus the layout it is only valid for (plain ints, safe to ``torch.save``)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "stream_length": self.stream_length,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a cursor saved by :meth:`state_dict` for the same data and layout."""
        for key in ("batch_size", "seq_len", "world_size", "stream_length"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"state was saved with {key}={state[key]} but this batcher has "
                    f"{key}={getattr(self, key)}; the cursor would point at different tokens"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_segments:
            raise ValueError(
                f"invalid cursor epoch={epoch}, position={position} "
                f"(positions run over [0, {self.num_segments}))"
            )
        self.epoch, self.position = epoch, position

    def __repr__(self) -> str:
        return (
            f"StreamBatcher(batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"rank={self.rank}, world_size={self.world_size}, stream_length={self.stream_length}, "
            f"num_segments={self.num_segments}, epoch={self.epoch}, position={self.position})"
        )


def iter_segments(data: Any, seq_len: int, *, batch_size: int = 1) -> Iterator[StreamBatch]:
    """Evaluation segments that score every target of ``data`` exactly once.

    The ``N - 1`` targets (tokens 1..N-1) are divided into ``batch_size`` contiguous streams whose
    lengths differ by at most one (the first streams get the extra target); each stream is walked
    in segments of ``seq_len``, the last one possibly shorter. A step's tensors are as wide as its
    longest row; shorter rows are padded with inputs ``PAD_INPUT_TOKEN`` and targets
    ``IGNORE_INDEX``. With ``batch_size=1`` there is never any padding. Only the first batch has
    ``reset_memory=True``. Rows after the first start without the context that precedes them, so
    ``batch_size=1`` gives the exact (slowest) evaluation.
    """
    _check_positive_int("seq_len", seq_len)
    _check_positive_int("batch_size", batch_size)
    tokens = _as_token_source(data)
    num_targets = len(tokens) - 1
    if num_targets < batch_size:
        raise ValueError(
            f"data of {len(tokens)} tokens has {max(num_targets, 0)} targets, fewer than "
            f"batch_size={batch_size} streams; need at least {batch_size + 1} tokens or a "
            f"smaller batch_size"
        )
    base, extra = divmod(num_targets, batch_size)
    lengths = [base + (1 if row < extra else 0) for row in range(batch_size)]
    starts = [sum(lengths[:row]) for row in range(batch_size)]
    longest = lengths[0]
    for step in range(math.ceil(longest / seq_len)):
        offset = step * seq_len
        width = min(seq_len, longest - offset)
        inputs = torch.full((batch_size, width), PAD_INPUT_TOKEN, dtype=torch.long)
        targets = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        for row, (start, length) in enumerate(zip(starts, lengths)):
            row_width = min(width, length - offset)
            if row_width <= 0:
                continue
            window = _gather_windows(tokens, [start + offset], row_width + 1)[0]
            inputs[row, :row_width] = window[:-1]
            targets[row, :row_width] = window[1:]
        yield StreamBatch(inputs, targets, reset_memory=step == 0, epoch=0, position=step)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _as_token_source(data: Any) -> TokenSource:
    """A 1-D integer array or tensor, without copying (so memory maps stay lazy)."""
    if isinstance(data, (bytes, bytearray)):
        data = np.frombuffer(data, dtype=np.uint8)
    elif hasattr(data, "numpy") and not isinstance(data, (np.ndarray, torch.Tensor)):
        data = data.numpy()  # ByteSplit / ByteCorpus
    elif isinstance(data, Sequence):
        data = np.asarray(data)
    elif not isinstance(data, (np.ndarray, torch.Tensor)):
        raise TypeError(f"expected 1-D tokens (array, tensor or ByteSplit), got {type(data)}")
    if data.ndim != 1:
        raise ValueError(f"expected 1-D tokens, got shape {tuple(data.shape)}")
    is_integer = (
        not (data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool)
        if isinstance(data, torch.Tensor)
        else np.issubdtype(data.dtype, np.integer)
    )
    if not is_integer:
        raise TypeError(f"expected integer tokens, got dtype {data.dtype}")
    return data


def _gather_windows(tokens: TokenSource, starts: list[int], width: int) -> torch.Tensor:
    """Rows ``tokens[s : s + width]`` for each start, as a (len(starts), width) LongTensor."""
    if isinstance(tokens, torch.Tensor):
        return torch.stack([tokens[start : start + width] for start in starts]).long()
    rows = np.stack([tokens[start : start + width] for start in starts])
    return torch.from_numpy(rows.astype(np.int64))
