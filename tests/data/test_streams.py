"""StreamBatcher layout, ranks, cursor and wraps; iter_segments covers every target once."""

from __future__ import annotations

import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from memtx.data import IGNORE_INDEX, ByteCorpus, StreamBatcher, iter_segments


def _positions(length: int) -> torch.Tensor:
    # Token value == its position in the split, so every check is an index check.
    return torch.arange(length)


def test_rows_are_contiguous_streams_and_targets_shift_by_one():
    data = _positions(1003)
    batcher = StreamBatcher(data, batch_size=4, seq_len=7)

    stream_length = 1003 // 4  # 250; the last 3 tokens are dropped
    assert batcher.stream_length == stream_length
    assert batcher.num_segments == len(batcher) == (stream_length - 1) // 7 == 35
    for step, (inputs, targets) in enumerate(batcher.iter_epoch()):
        assert inputs.shape == targets.shape == (4, 7)
        assert inputs.dtype == targets.dtype == torch.long
        for row in range(4):
            start = row * stream_length + step * 7
            assert inputs[row].tolist() == list(range(start, start + 7))
            assert targets[row].tolist() == list(range(start + 1, start + 8))
    assert step == 34
    # Nothing ever reads past the end of a row's own stream.
    assert (inputs[:, -1] < torch.arange(1, 5) * stream_length - 1).all()


def test_byte_split_source_matches_file_bytes(tmp_path: Path):
    payload = np.random.default_rng(1).integers(0, 256, size=2000, dtype=np.uint8)
    (tmp_path / "data.bin").write_bytes(payload.tobytes())
    split = ByteCorpus(tmp_path / "data.bin").split("valid")  # bytes [1800, 1900)

    batcher = StreamBatcher(split, batch_size=2, seq_len=4)
    inputs, targets = batcher.batch_at(3)

    stream_length = 100 // 2
    for row in range(2):
        start = 1800 + row * stream_length + 3 * 4
        assert inputs[row].tolist() == payload[start : start + 4].tolist()
        assert targets[row].tolist() == payload[start + 1 : start + 5].tolist()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(np.arange(500, dtype=np.int64), id="numpy"),
        pytest.param(torch.arange(500, dtype=torch.int32), id="int32-tensor"),
        pytest.param(bytes(range(250)) * 2, id="bytes"),
    ],
)
def test_accepts_arrays_tensors_and_bytes(data):
    inputs, targets = StreamBatcher(data, batch_size=2, seq_len=5).batch_at(1)
    expected = np.asarray(list(data) if isinstance(data, bytes) else data)
    assert inputs.dtype == torch.long
    assert inputs[1].tolist() == expected[250 + 5 : 250 + 10].tolist()
    assert targets[1].tolist() == expected[251 + 5 : 251 + 10].tolist()


def test_ranks_own_disjoint_streams_whose_union_is_the_single_process_layout():
    data = _positions(4 * 100 + 3)
    single = StreamBatcher(data, batch_size=4, seq_len=9)
    rank0 = StreamBatcher(data, batch_size=2, seq_len=9, rank=0, world_size=2)
    rank1 = StreamBatcher(data, batch_size=2, seq_len=9, rank=1, world_size=2)

    assert len(single) == len(rank0) == len(rank1)
    for (inputs, targets), (inputs0, targets0), (inputs1, targets1) in zip(
        single.iter_epoch(), rank0.iter_epoch(), rank1.iter_epoch()
    ):
        assert torch.equal(torch.cat([inputs0, inputs1]), inputs)
        assert torch.equal(torch.cat([targets0, targets1]), targets)
        assert not set(inputs0.flatten().tolist()) & set(inputs1.flatten().tolist())


def test_cursor_state_restores_exactly_and_is_rank_independent():
    data = _positions(2000)
    batcher = StreamBatcher(data, batch_size=3, seq_len=10)
    for _ in range(len(batcher) + 5):  # into the second epoch
        batcher.next_batch()
    state = batcher.state_dict()
    assert state["epoch"] == 1 and state["position"] == 5
    assert all(type(value) is int for value in state.values())
    expected = [batcher.next_batch() for _ in range(len(batcher))]  # crosses another wrap

    resumed = StreamBatcher(data, batch_size=3, seq_len=10)
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    for want, got in zip(expected, (resumed.next_batch() for _ in range(len(resumed)))):
        assert torch.equal(want.inputs, got.inputs) and torch.equal(want.targets, got.targets)
        assert (want.epoch, want.position, want.reset_memory) == (
            got.epoch, got.position, got.reset_memory,
        )

    # All ranks step together, so one rank's cursor fits the others.
    other_rank = StreamBatcher(data, batch_size=1, seq_len=10, rank=1, world_size=3)
    other_rank.load_state_dict(StreamBatcher(data, 1, 10, world_size=3).state_dict())


def test_loading_a_cursor_for_another_layout_is_refused():
    state = StreamBatcher(_positions(1000), batch_size=2, seq_len=10).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        StreamBatcher(_positions(1000), batch_size=2, seq_len=20).load_state_dict(state)


def test_forever_iteration_wraps_and_flags_memory_reset():
    batcher = StreamBatcher(_positions(200), batch_size=2, seq_len=8)
    epoch_length = len(batcher)  # (100 - 1) // 8 = 12
    batches = list(itertools.islice(batcher, 2 * epoch_length + 1))

    resets = [index for index, batch in enumerate(batches) if batch.reset_memory]
    assert resets == [0, epoch_length, 2 * epoch_length]
    assert [batch.epoch for batch in batches[epoch_length - 1 : epoch_length + 1]] == [0, 1]
    assert torch.equal(batches[epoch_length].inputs, batches[0].inputs)
    assert batcher.epoch == 2 and batcher.position == 1


def test_iter_epoch_finishes_the_current_epoch_after_a_resume():
    batcher = StreamBatcher(_positions(200), batch_size=2, seq_len=8)
    batcher.load_state_dict({"epoch": 0, "position": 10})
    assert [batch.position for batch in batcher.iter_epoch()] == [10, 11]
    assert (batcher.epoch, batcher.position) == (1, 0)
    assert len(list(batcher.iter_epoch())) == len(batcher)


def test_batches_survive_pickling():
    batch = StreamBatcher(_positions(100), batch_size=2, seq_len=4).batch_at(2)
    copy = pickle.loads(pickle.dumps(batch))
    assert torch.equal(copy.inputs, batch.inputs) and copy.position == 2
    inputs, targets = copy
    assert torch.equal(targets, batch.targets)


def test_too_small_split_says_how_many_tokens_are_needed():
    # 4 streams x (seq_len 10 + 1) = 44 tokens needed.
    with pytest.raises(ValueError, match="need at least 44 tokens") as error:
        StreamBatcher(_positions(43), batch_size=2, seq_len=10, world_size=2)
    assert "smaller batch_size or seq_len" in str(error.value)
    assert len(StreamBatcher(_positions(44), batch_size=2, seq_len=10, world_size=2)) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"batch_size": 0, "seq_len": 4}, id="zero-batch"),
        pytest.param({"batch_size": 2, "seq_len": 0}, id="zero-seq-len"),
        pytest.param({"batch_size": 2, "seq_len": 4, "rank": 2, "world_size": 2}, id="bad-rank"),
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        StreamBatcher(_positions(100), **kwargs)


@pytest.mark.parametrize(
    "length, seq_len, batch_size",
    [
        pytest.param(101, 10, 1, id="exact-segments-batch1"),
        pytest.param(107, 10, 1, id="partial-last-segment-batch1"),
        pytest.param(107, 10, 3, id="ragged-rows-batch3"),
        pytest.param(50, 7, 4, id="short-split-batch4"),
        pytest.param(6, 100, 5, id="one-target-per-row"),
    ],
)
def test_eval_segments_score_every_target_exactly_once(length, seq_len, batch_size):
    data = _positions(length)
    scored: list[int] = []
    steps = list(iter_segments(data, seq_len, batch_size=batch_size))
    for step, (inputs, targets) in enumerate(steps):
        assert inputs.shape == targets.shape and inputs.shape[0] == batch_size
        assert inputs.shape[1] <= seq_len
        real = targets != IGNORE_INDEX
        # Real targets are the token right after their input (the data is positions).
        assert torch.equal(targets[real], inputs[real] + 1)
        scored.extend(targets[real].tolist())
        assert steps[step].reset_memory == (step == 0)
    assert len(scored) == length - 1
    assert sorted(scored) == list(range(1, length))
    # Rows are consecutive stretches and each row is read in order, segment after segment.
    per_row = [
        [t for inputs, targets in steps for t in targets[row].tolist() if t != IGNORE_INDEX]
        for row in range(batch_size)
    ]
    assert sum(per_row, []) == list(range(1, length))


def test_eval_batch1_has_no_padding_and_a_partial_last_segment():
    steps = list(iter_segments(_positions(107), 10))
    assert [inputs.shape[1] for inputs, _ in steps] == [10] * 10 + [6]
    assert all((targets != IGNORE_INDEX).all() for _, targets in steps)


def test_eval_needs_a_target_per_row():
    with pytest.raises(ValueError, match="batch_size=5"):
        list(iter_segments(_positions(5), 4, batch_size=5))
