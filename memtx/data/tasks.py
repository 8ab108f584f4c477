"""Synthetic long-range tasks whose answers need memory from earlier segments.

Both tasks emit byte tokens (vocabulary 256) drawn from a few small, disjoint, printable regions so
that tiny models can learn them and batches are readable when decoded as text:

=========================  ===========================  =====================
region                     bytes                        used by
=========================  ===========================  =====================
filler                     ``a`` .. (up to ``z``)       both
keys                       ``A`` .. (up to ``Z``)       :class:`AssociativeRecall`
values                     ``0`` .. (up to ``9``)       :class:`AssociativeRecall`
copy symbols               ``A`` .. (up to ``Z``)       :class:`DelayedCopy`
query marker ``?``         63                           :class:`AssociativeRecall`
copy marker ``#``          35                           :class:`DelayedCopy`
=========================  ===========================  =====================

Episodes. Each row of a batch is an independent, endless stream of segments of ``seq_len`` tokens
made of back-to-back episodes. An episode with distance ``d`` (drawn uniformly from
``distances``) is ``d + 1`` segments::

    [write segment] [d - 1 filler-only segments] [query segment]

The write segment holds the information (key/value pairs, or the string to copy) at a random
offset among filler; the query segment asks for it at a random offset among filler. So the
information needed at every answer lies exactly ``d`` segments back, and none of it is in the
query segment before the answer nor in the segments in between (those are filler only). Every
answer, including its target token, lies inside its query segment.

Layout of a :class:`TaskBatch` (all ``(batch, length)``, aligned with ``inputs``):

* ``targets``: full next-token targets (``targets[:, t]`` is the token after ``inputs[:, t]``,
  across segment boundaries too) for training on every token;
* ``answer_targets``: the same token at answer positions, ``IGNORE_INDEX`` (-100) elsewhere. This
  is **the default training target**: ``cross_entropy(logits, answer_targets,
  ignore_index=-100)`` scores answers only, which is what the task measures. Filler is random, so
  training on all ``targets`` mostly adds irreducible noise to the loss;
* ``answer_mask``: True at answer positions (``answer_targets != IGNORE_INDEX``);
* ``distances``: for answer positions, how many segments back the needed information was
  written; 0 elsewhere.

Accuracy is counted on answer positions only (:func:`evaluate_answers`, per distance).
Generation is seeded and reproducible: row ``b`` of a stream depends only on ``(seed, b)``, not on
the batch size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from memtx.data.streams import IGNORE_INDEX

__all__ = [
    "COPY_MARKER",
    "FILLER_TOKEN_BASE",
    "KEY_TOKEN_BASE",
    "QUERY_MARKER",
    "SYMBOL_TOKEN_BASE",
    "VALUE_TOKEN_BASE",
    "AssociativeRecall",
    "DelayedCopy",
    "SegmentTask",
    "TaskBatch",
    "TaskStream",
    "accuracy_by_distance",
    "evaluate_answers",
    "merge_answer_counts",
]

FILLER_TOKEN_BASE = ord("a")
KEY_TOKEN_BASE = ord("A")
VALUE_TOKEN_BASE = ord("0")
SYMBOL_TOKEN_BASE = ord("A")
QUERY_MARKER = ord("?")
COPY_MARKER = ord("#")
MAX_FILLER = 26
MAX_KEYS = 26
MAX_VALUES = 10
MAX_SYMBOLS = 26

Seed = Union[int, np.random.Generator, torch.Generator]


@dataclass(eq=False)  # tensors have no single truth value, so field-wise == is meaningless
class TaskBatch:
    """Tokens and answer annotations for ``num_segments`` segments of ``seq_len`` (module doc)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    answer_targets: torch.Tensor
    answer_mask: torch.Tensor
    distances: torch.Tensor
    seq_len: int
    # True for the first segment of fresh streams: mirrors StreamBatch for shared trainer code.
    reset_memory: bool = False

    @property
    def num_segments(self) -> int:
        return self.inputs.shape[1] // self.seq_len

    @property
    def num_answers(self) -> int:
        return int(self.answer_mask.sum())

    def segment(self, index: int) -> TaskBatch:
        """Segment ``index`` as a one-segment batch (views, no copies)."""
        if not 0 <= index < self.num_segments:
            raise IndexError(f"segment {index} is outside [0, {self.num_segments})")
        columns = slice(index * self.seq_len, (index + 1) * self.seq_len)
        return TaskBatch(
            self.inputs[:, columns],
            self.targets[:, columns],
            self.answer_targets[:, columns],
            self.answer_mask[:, columns],
            self.distances[:, columns],
            self.seq_len,
            reset_memory=self.reset_memory and index == 0,
        )

    def segments(self) -> Iterator[TaskBatch]:
        for index in range(self.num_segments):
            yield self.segment(index)

    def text(self, row: int) -> str:
        """Row ``row`` of the inputs decoded as text, for eyeballing a batch."""
        return bytes(self.inputs[row].tolist()).decode("latin-1")


@dataclass
class _Episode:
    """One row's episode, flattened: ``(d + 1) * seq_len`` tokens with their answer annotations."""

    tokens: np.ndarray
    answer_mask: np.ndarray
    distance: int


class SegmentTask(ABC):
    """Shared episode streaming for the synthetic tasks (see the module doc)."""

    def __init__(self, *, seq_len: int, distances: Sequence[int], num_filler: int) -> None:
        _check_int_range("seq_len", seq_len, 1)
        if isinstance(distances, int) or not isinstance(distances, Iterable):
            raise ValueError(f"distances must be a sequence of ints >= 1, got {distances!r}")
        distances = tuple(distances)
        if not distances:
            raise ValueError("distances must not be empty")
        for distance in distances:
            _check_int_range("each distance (in segments)", distance, 1)
        _check_int_range("num_filler", num_filler, 1, MAX_FILLER)
        self.seq_len = seq_len
        self.distances: tuple[int, ...] = tuple(sorted(set(distances)))
        self.num_filler = num_filler

    @property
    @abstractmethod
    def chance_accuracy(self) -> float:
        """Expected answer accuracy of a model without memory that knows the task format."""

    @abstractmethod
    def _fill_write_and_query(
        self, rng: np.random.Generator, write: np.ndarray, query: np.ndarray, answers: np.ndarray
    ) -> None:
        """Write the information into ``write`` and ask for it in ``query``, marking ``answers``.

        Both segments arrive filled with filler; ``answers`` is the query segment's answer mask.
        """

    def _episode(self, rng: np.random.Generator) -> _Episode:
        distance = int(rng.choice(self.distances))
        length = (distance + 1) * self.seq_len
        tokens = FILLER_TOKEN_BASE + rng.integers(0, self.num_filler, size=length)
        answer_mask = np.zeros(length, dtype=bool)
        query_start = distance * self.seq_len
        self._fill_write_and_query(
            rng,
            tokens[: self.seq_len],
            tokens[query_start:],
            answer_mask[query_start:],
        )
        return _Episode(tokens, answer_mask, distance)

    def batches(self, batch_size: int, seed: Seed = 0) -> TaskStream:
        """An endless iterator of one-segment :class:`TaskBatch` es; row ``b`` is stream ``b``."""
        return TaskStream(self, batch_size, seed)

    def generate(self, batch_size: int, num_segments: int, seed: Seed = 0) -> TaskBatch:
        """The first ``num_segments`` segments of :meth:`batches`, concatenated along time."""
        _check_int_range("num_segments", num_segments, 1)
        shortest = self.distances[0] + 1
        if num_segments < shortest:
            raise ValueError(
                f"num_segments={num_segments} cannot hold one episode (write + query "
                f"{self.distances[0]} segments later needs {shortest}); use num_segments >= "
                f"{shortest}"
            )
        stream = self.batches(batch_size, seed)
        pieces = [next(stream) for _ in range(num_segments)]
        return TaskBatch(
            *(torch.cat([getattr(p, name) for p in pieces], dim=1) for name in _TENSOR_FIELDS),
            seq_len=self.seq_len,
            reset_memory=True,
        )


_TENSOR_FIELDS = ("inputs", "targets", "answer_targets", "answer_mask", "distances")


class TaskStream:
    """Endless per-row episode streams for a :class:`SegmentTask`, one segment per ``next()``."""

    def __init__(self, task: SegmentTask, batch_size: int, seed: Seed = 0) -> None:
        _check_int_range("batch_size", batch_size, 1)
        self.task = task
        self.batch_size = batch_size
        self.seed = _seed_to_int(seed)
        self.step = 0
        # One generator per row, keyed by row index: row b is the same for any batch size.
        self._row_rngs = [
            np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(b,))))
            for b in range(batch_size)
        ]
        empty_tokens = np.zeros(0, dtype=np.int64)
        self._pending_tokens = [empty_tokens] * batch_size
        self._pending_answers = [np.zeros(0, dtype=bool)] * batch_size
        self._pending_distances = [empty_tokens] * batch_size

    def __iter__(self) -> TaskStream:
        return self

    def __next__(self) -> TaskBatch:
        seq_len = self.task.seq_len
        shape = (self.batch_size, seq_len)
        window = np.empty((self.batch_size, seq_len + 1), dtype=np.int64)
        answer_mask = np.empty(shape, dtype=bool)
        distances = np.empty(shape, dtype=np.int64)
        for row in range(self.batch_size):
            # One token beyond the segment is needed for the last next-token target.
            while len(self._pending_tokens[row]) < seq_len + 1:
                self._append_episode(row)
            window[row] = self._pending_tokens[row][: seq_len + 1]
            answer_mask[row] = self._pending_answers[row][:seq_len]
            distances[row] = self._pending_distances[row][:seq_len]
            self._pending_tokens[row] = self._pending_tokens[row][seq_len:]
            self._pending_answers[row] = self._pending_answers[row][seq_len:]
            self._pending_distances[row] = self._pending_distances[row][seq_len:]
        inputs = torch.from_numpy(window[:, :-1].copy())
        targets = torch.from_numpy(window[:, 1:].copy())
        mask = torch.from_numpy(answer_mask)
        batch = TaskBatch(
            inputs=inputs,
            targets=targets,
            answer_targets=torch.where(mask, targets, torch.full_like(targets, IGNORE_INDEX)),
            answer_mask=mask,
            distances=torch.from_numpy(distances),
            seq_len=seq_len,
            reset_memory=self.step == 0,
        )
        self.step += 1
        return batch

    def _append_episode(self, row: int) -> None:
        episode = self.task._episode(self._row_rngs[row])
        distances = np.where(episode.answer_mask, episode.distance, 0).astype(np.int64)
        self._pending_tokens[row] = np.concatenate([self._pending_tokens[row], episode.tokens])
        self._pending_answers[row] = np.concatenate(
            [self._pending_answers[row], episode.answer_mask]
        )
        self._pending_distances[row] = np.concatenate([self._pending_distances[row], distances])


class AssociativeRecall(SegmentTask):
    """Recall the value paired with a key written ``distance`` segments earlier.

    Write segment: ``K1 V1 K2 V2 ...`` (``num_pairs`` distinct keys, values drawn independently)
    at a random offset. Query segment: ``? K V`` for ``num_queries`` distinct written keys in
    random order, at a random offset; the answer is the ``V`` (scored at the ``K`` position).

    Raises:
        ValueError: a parameter is out of range, or the pairs (``2 * num_pairs`` tokens) or the
            queries (``3 * num_queries`` tokens) do not fit in a segment.
    """

    def __init__(
        self,
        seq_len: int = 64,
        distances: Sequence[int] = (1, 2, 4),
        *,
        num_pairs: int = 4,
        num_queries: int | None = None,
        num_keys: int = 16,
        num_values: int = 10,
        num_filler: int = 8,
    ) -> None:
        super().__init__(seq_len=seq_len, distances=distances, num_filler=num_filler)
        _check_int_range("num_pairs", num_pairs, 1)
        num_queries = num_pairs if num_queries is None else num_queries
        _check_int_range("num_queries", num_queries, 1, num_pairs)
        _check_int_range("num_keys", num_keys, num_pairs, MAX_KEYS)
        _check_int_range("num_values", num_values, 2, MAX_VALUES)
        if 2 * num_pairs > seq_len:
            raise ValueError(
                f"{num_pairs} key/value pairs need {2 * num_pairs} tokens, more than "
                f"seq_len={seq_len}; use fewer pairs or a longer seq_len"
            )
        if 3 * num_queries > seq_len:
            raise ValueError(
                f"{num_queries} queries ('? key value') need {3 * num_queries} tokens, more than "
                f"seq_len={seq_len}; use fewer queries or a longer seq_len"
            )
        self.num_pairs = num_pairs
        self.num_queries = num_queries
        self.num_keys = num_keys
        self.num_values = num_values

    @property
    def chance_accuracy(self) -> float:
        # Values are drawn independently and uniformly, so knowing the format does not help.
        return 1.0 / self.num_values

    def _fill_write_and_query(
        self, rng: np.random.Generator, write: np.ndarray, query: np.ndarray, answers: np.ndarray
    ) -> None:
        keys = KEY_TOKEN_BASE + rng.choice(self.num_keys, size=self.num_pairs, replace=False)
        values = VALUE_TOKEN_BASE + rng.integers(0, self.num_values, size=self.num_pairs)
        offset = int(rng.integers(0, self.seq_len - 2 * self.num_pairs + 1))
        write[offset : offset + 2 * self.num_pairs : 2] = keys
        write[offset + 1 : offset + 2 * self.num_pairs : 2] = values

        asked = rng.choice(self.num_pairs, size=self.num_queries, replace=False)
        offset = int(rng.integers(0, self.seq_len - 3 * self.num_queries + 1))
        block = slice(offset, offset + 3 * self.num_queries)
        query[block][0::3] = QUERY_MARKER
        query[block][1::3] = keys[asked]
        query[block][2::3] = values[asked]
        # Scored where the key is the input: the model must then emit the value.
        answers[block][1::3] = True


class DelayedCopy(SegmentTask):
    """Reproduce a random string written ``distance`` segments earlier.

    Write segment: ``copy_len`` random symbols at a random offset. Query segment: ``#`` followed
    by the same string; the answers are the ``copy_len`` string tokens (scored at the positions of
    ``#`` and of the first ``copy_len - 1`` symbols, teacher-forced).

    Raises:
        ValueError: a parameter is out of range, or ``#`` plus the string does not fit in a
            segment.
    """

    def __init__(
        self,
        seq_len: int = 64,
        distances: Sequence[int] = (1, 2, 4),
        *,
        copy_len: int = 8,
        num_symbols: int = 8,
        num_filler: int = 8,
    ) -> None:
        super().__init__(seq_len=seq_len, distances=distances, num_filler=num_filler)
        _check_int_range("copy_len", copy_len, 1)
        _check_int_range("num_symbols", num_symbols, 2, MAX_SYMBOLS)
        if copy_len + 1 > seq_len:
            raise ValueError(
                f"the copy marker plus copy_len={copy_len} tokens need {copy_len + 1} tokens, "
                f"more than seq_len={seq_len}; use a shorter copy_len or a longer seq_len"
            )
        self.copy_len = copy_len
        self.num_symbols = num_symbols

    @property
    def chance_accuracy(self) -> float:
        return 1.0 / self.num_symbols

    def _fill_write_and_query(
        self, rng: np.random.Generator, write: np.ndarray, query: np.ndarray, answers: np.ndarray
    ) -> None:
        string = SYMBOL_TOKEN_BASE + rng.integers(0, self.num_symbols, size=self.copy_len)
        offset = int(rng.integers(0, self.seq_len - self.copy_len + 1))
        write[offset : offset + self.copy_len] = string

        offset = int(rng.integers(0, self.seq_len - self.copy_len))
        query[offset] = COPY_MARKER
        query[offset + 1 : offset + 1 + self.copy_len] = string
        answers[offset : offset + self.copy_len] = True


def evaluate_answers(logits: torch.Tensor, batch: TaskBatch) -> dict[int, tuple[int, int]]:
    """``{distance: (correct, total)}`` over the answer positions of ``batch``.

    ``logits`` is ``(batch, length, vocab)`` aligned with ``batch.inputs`` (argmax is taken), or
    already-decoded integer predictions of shape ``(batch, length)``. Only answer positions count.
    """
    if logits.shape[:2] != batch.inputs.shape:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} does not start with the batch shape "
            f"{tuple(batch.inputs.shape)}"
        )
    if logits.dim() == 3:
        predictions = logits.argmax(dim=-1)
    elif logits.dim() == 2 and not logits.is_floating_point():
        predictions = logits
    else:
        raise ValueError(
            "expected (batch, length, vocab) logits or (batch, length) integer predictions"
        )
    predictions = predictions.to(batch.answer_targets.device)
    correct = (predictions == batch.answer_targets) & batch.answer_mask
    counts: dict[int, tuple[int, int]] = {}
    for distance in torch.unique(batch.distances[batch.answer_mask]).tolist():
        at_distance = batch.answer_mask & (batch.distances == distance)
        counts[int(distance)] = (int(correct[at_distance].sum()), int(at_distance.sum()))
    return counts


def merge_answer_counts(
    *counts: dict[int, tuple[int, int]],
) -> dict[int, tuple[int, int]]:
    """Sum several :func:`evaluate_answers` results (e.g. over evaluation batches)."""
    merged: dict[int, tuple[int, int]] = {}
    for count in counts:
        for distance, (correct, total) in count.items():
            previous_correct, previous_total = merged.get(distance, (0, 0))
            merged[distance] = (previous_correct + correct, previous_total + total)
    return dict(sorted(merged.items()))


def accuracy_by_distance(counts: dict[int, tuple[int, int]]) -> dict[int, float]:
    """``{distance: correct / total}`` from :func:`evaluate_answers` counts."""
    return {distance: correct / total for distance, (correct, total) in counts.items() if total}


def _seed_to_int(seed: Seed) -> int:
    if isinstance(seed, np.random.Generator):
        return int(seed.integers(0, 2**63))
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=seed))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(
            f"seed must be an int >= 0, a numpy Generator or a torch.Generator, got {seed!r}"
        )
    return int(seed)


def _check_int_range(name: str, value: object, low: int, high: int | None = None) -> None:
    valid = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if valid and value >= low and (high is None or value <= high):
        return
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name} must be an int {bound}, got {value!r}")
