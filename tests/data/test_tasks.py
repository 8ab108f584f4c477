"""Synthetic tasks: reproducibility, episode structure (information exactly `distance` back),
answer layout, chance level, per-distance evaluation and parameter validation."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from memtx.data import (
    IGNORE_INDEX,
    AssociativeRecall,
    DelayedCopy,
    accuracy_by_distance,
    evaluate_answers,
    merge_answer_counts,
)
from memtx.data.tasks import (
    COPY_MARKER,
    FILLER_TOKEN_BASE,
    KEY_TOKEN_BASE,
    QUERY_MARKER,
    SYMBOL_TOKEN_BASE,
    VALUE_TOKEN_BASE,
)

SEQ_LEN = 24


def _recall(**overrides) -> AssociativeRecall:
    config = dict(seq_len=SEQ_LEN, distances=(1, 2, 4), num_pairs=3, num_keys=8, num_values=6)
    config.update(overrides)
    return AssociativeRecall(**config)


def _copy(**overrides) -> DelayedCopy:
    config = dict(seq_len=SEQ_LEN, distances=(1, 3), copy_len=5, num_symbols=6)
    config.update(overrides)
    return DelayedCopy(**config)


TASKS = [pytest.param(_recall, id="associative-recall"), pytest.param(_copy, id="delayed-copy")]


def _is_filler(tokens: torch.Tensor, task) -> bool:
    return bool(_filler_mask(tokens, task).all())


def _filler_mask(tokens: torch.Tensor, task) -> torch.Tensor:
    return (tokens >= FILLER_TOKEN_BASE) & (tokens < FILLER_TOKEN_BASE + task.num_filler)


@pytest.mark.parametrize("make_task", TASKS)
def test_same_seed_same_data_different_seed_different_data(make_task):
    task = make_task()
    first, again, other = (task.generate(4, 10, seed=s) for s in (7, 7, 8))
    for name in ("inputs", "targets", "answer_targets", "answer_mask", "distances"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.inputs, other.inputs)
    # numpy and torch generators are accepted and are reproducible too.
    from_numpy = [task.generate(2, 5, np.random.default_rng(3)).inputs for _ in range(2)]
    assert torch.equal(*from_numpy)
    from_torch = [task.generate(2, 5, torch.Generator().manual_seed(3)).inputs for _ in range(2)]
    assert torch.equal(*from_torch)


@pytest.mark.parametrize("make_task", TASKS)
def test_rows_do_not_depend_on_batch_size(make_task):
    task = make_task()
    small, large = task.generate(2, 9, seed=1), task.generate(5, 9, seed=1)
    assert torch.equal(small.inputs, large.inputs[:2])
    assert torch.equal(small.answer_targets, large.answer_targets[:2])


@pytest.mark.parametrize("make_task", TASKS)
def test_generate_equals_the_segment_stream(make_task):
    task = make_task()
    whole = task.generate(3, 8, seed=5)
    stream = task.batches(3, seed=5)
    for index, (piece, expected) in enumerate(zip(stream, whole.segments())):
        assert piece.inputs.shape == (3, SEQ_LEN)
        assert piece.reset_memory == (index == 0)
        for name in ("inputs", "targets", "answer_targets", "answer_mask", "distances"):
            assert torch.equal(getattr(piece, name), getattr(expected, name))
        if index == 7:
            break


@pytest.mark.parametrize("make_task", TASKS)
def test_targets_are_next_tokens_and_answer_targets_mask_the_rest(make_task):
    task = make_task()
    batch = task.generate(4, 12, seed=2)
    longer = task.generate(4, 13, seed=2)

    assert batch.inputs.shape == batch.targets.shape == (4, 12 * SEQ_LEN)
    assert torch.equal(batch.targets[:, :-1], batch.inputs[:, 1:])
    assert torch.equal(batch.targets[:, -1], longer.inputs[:, 12 * SEQ_LEN])
    mask = batch.answer_mask
    assert batch.num_answers > 0
    assert torch.equal(batch.answer_targets[mask], batch.targets[mask])
    assert (batch.answer_targets[~mask] == IGNORE_INDEX).all()
    assert torch.equal(mask, batch.answer_targets != IGNORE_INDEX)
    assert (batch.distances[~mask] == 0).all()
    assert set(batch.distances[mask].tolist()) <= set(task.distances)
    # The scored token is inside the query segment: never at a segment's last input position.
    positions = mask.nonzero()[:, 1]
    assert ((positions % SEQ_LEN) < SEQ_LEN - 1).all()
    assert (batch.inputs < 128).all()


def test_recall_answer_is_the_value_written_exactly_distance_segments_back():
    task = _recall()
    batch = task.generate(6, 30, seed=11)
    seen_distances = set()
    for row, position in batch.answer_mask.nonzero().tolist():
        tokens = batch.inputs[row].view(-1, SEQ_LEN)
        query_segment, offset = divmod(position, SEQ_LEN)
        distance = int(batch.distances[row, position])
        write_segment = query_segment - distance
        key, value = int(batch.inputs[row, position]), int(batch.targets[row, position])
        seen_distances.add(distance)

        assert int(batch.inputs[row, position - 1]) == QUERY_MARKER
        assert KEY_TOKEN_BASE <= key < KEY_TOKEN_BASE + task.num_keys
        assert VALUE_TOKEN_BASE <= value < VALUE_TOKEN_BASE + task.num_values
        # Written exactly `distance` segments back, once, followed by its value.
        write = tokens[write_segment]
        (key_at,) = (write == key).nonzero()[:, 0].tolist()
        assert int(write[key_at + 1]) == value
        # Nothing in between but filler ...
        for between in range(write_segment + 1, query_segment):
            assert _is_filler(tokens[between], task)
        # ... and in the query segment the key occurs only where it is asked.
        assert (tokens[query_segment] == key).nonzero()[:, 0].tolist() == [offset]
    assert seen_distances == {1, 2, 4}


def test_copy_answers_are_the_string_written_exactly_distance_segments_back():
    task = _copy()
    batch = task.generate(6, 30, seed=12)
    queries = 0
    for row, position in (batch.inputs == COPY_MARKER).nonzero().tolist():
        tokens = batch.inputs[row].view(-1, SEQ_LEN)
        query_segment, offset = divmod(position, SEQ_LEN)
        answers = slice(position, position + task.copy_len)
        distance = int(batch.distances[row, position])
        assert batch.answer_mask[row, answers].all()
        segment_answers = batch.answer_mask[row].view(-1, SEQ_LEN)[query_segment]
        assert int(segment_answers.sum()) == task.copy_len
        assert (batch.distances[row, answers] == distance).all()
        string = batch.answer_targets[row, answers]
        assert ((string >= SYMBOL_TOKEN_BASE) & (string < SYMBOL_TOKEN_BASE + 6)).all()

        write = tokens[query_segment - distance]
        symbols = write[~_filler_mask(write, task)]
        assert torch.equal(symbols, string)
        for between in range(query_segment - distance + 1, query_segment):
            assert _is_filler(tokens[between], task)
        # Before the marker the query segment is filler only: the string is not there yet.
        assert _is_filler(tokens[query_segment][:offset], task)
        queries += 1
    assert queries > 20
    assert batch.num_answers == queries * task.copy_len


def test_every_written_episode_gets_its_query_in_an_endless_stream():
    task = _recall(distances=(2,), num_pairs=2, num_queries=1)
    batch = task.generate(1, 30, seed=0)
    # distance 2 => episodes of 3 segments: write, filler, query.
    per_segment = batch.answer_mask.view(-1, SEQ_LEN).sum(dim=1).tolist()
    assert per_segment == [0, 0, 1] * 10


@pytest.mark.parametrize(
    "make_task, expected",
    [
        pytest.param(lambda: _recall(num_values=6), 1 / 6, id="recall-6-values"),
        pytest.param(lambda: _recall(num_values=10), 1 / 10, id="recall-10-values"),
        pytest.param(lambda: _copy(num_symbols=4), 1 / 4, id="copy-4-symbols"),
    ],
)
def test_chance_accuracy_matches_a_memoryless_guesser(make_task, expected):
    task = make_task()
    assert task.chance_accuracy == pytest.approx(expected)
    batch = task.generate(16, 40, seed=3)
    # Guess the same in-alphabet answer everywhere: what a model with no memory can do.
    base = VALUE_TOKEN_BASE if isinstance(task, AssociativeRecall) else SYMBOL_TOKEN_BASE
    counts = evaluate_answers(torch.full_like(batch.inputs, base), batch)
    correct = sum(c for c, _ in counts.values())
    total = sum(t for _, t in counts.values())
    assert total > 500
    assert correct / total == pytest.approx(expected, abs=0.04)


def test_evaluate_answers_counts_per_distance():
    task = _recall()
    batch = task.generate(4, 20, seed=4)
    logits = torch.nn.functional.one_hot(batch.targets, 256).float()
    # Break every distance-2 answer: predict the key instead of the value.
    wrong = batch.answer_mask & (batch.distances == 2)
    logits[wrong] = torch.nn.functional.one_hot(batch.inputs[wrong], 256).float()

    counts = evaluate_answers(logits, batch)

    totals = {d: int((batch.answer_mask & (batch.distances == d)).sum()) for d in (1, 2, 4)}
    assert counts == {1: (totals[1], totals[1]), 2: (0, totals[2]), 4: (totals[4], totals[4])}
    assert accuracy_by_distance(counts) == {1: 1.0, 2: 0.0, 4: 1.0}
    assert merge_answer_counts(counts, counts)[2] == (0, 2 * totals[2])
    # Non-answer positions never count, whatever is predicted there.
    logits[~batch.answer_mask] = 0.0
    assert evaluate_answers(logits, batch) == counts


def test_evaluate_answers_rejects_misaligned_logits():
    batch = _copy().generate(2, 4, seed=0)
    with pytest.raises(ValueError, match="shape"):
        evaluate_answers(torch.zeros(2, 10, 256), batch)


def test_answers_only_loss_uses_ignore_index():
    batch = _recall().generate(2, 6, seed=9)
    logits = torch.randn(*batch.inputs.shape, 256)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch.answer_targets.flatten(), ignore_index=IGNORE_INDEX
    )
    mask = batch.answer_mask.flatten()
    expected = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1)[mask], batch.targets.flatten()[mask]
    )
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize(
    "build, message",
    [
        pytest.param(
            lambda: _recall(seq_len=10, num_pairs=6, num_keys=8), "pairs", id="pairs-do-not-fit"
        ),
        pytest.param(lambda: _recall(seq_len=8, num_pairs=3), "queries", id="queries-do-not-fit"),
        pytest.param(
            lambda: _recall(num_pairs=5, num_keys=4), "num_keys", id="fewer-keys-than-pairs"
        ),
        pytest.param(lambda: _recall(num_values=11), "num_values", id="too-many-values"),
        pytest.param(lambda: _recall(num_queries=4), "num_queries", id="more-queries-than-pairs"),
        pytest.param(lambda: _recall(distances=()), "distances", id="no-distances"),
        pytest.param(lambda: _recall(distances=(0, 1)), "distance", id="zero-distance"),
        pytest.param(lambda: _recall(distances=2), "distances", id="distance-not-a-list"),
        pytest.param(lambda: _recall(num_filler=0), "num_filler", id="no-filler"),
        pytest.param(lambda: _copy(seq_len=5, copy_len=5), "copy_len", id="copy-does-not-fit"),
        pytest.param(lambda: _copy(num_symbols=1), "num_symbols", id="one-symbol"),
        pytest.param(lambda: _copy(seq_len=0), "seq_len", id="zero-seq-len"),
        pytest.param(lambda: _recall().generate(2, 1), "num_segments", id="too-few-segments"),
        pytest.param(lambda: _recall().generate(0, 5), "batch_size", id="zero-batch"),
        pytest.param(lambda: _recall().generate(1, 5, seed=-1), "seed", id="negative-seed"),
    ],
)
def test_invalid_parameters_are_reported(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_batch_text_is_readable():
    batch = _recall(distances=(1,)).generate(1, 2, seed=0)
    text = batch.text(0)
    assert len(text) == 2 * SEQ_LEN
    assert "?" not in text[:SEQ_LEN] and "?" in text[SEQ_LEN:]
