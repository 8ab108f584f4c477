"""Bad input fails early with a message that names the problem and the fix."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import memtx
from memtx.state import State, memory_field

SMALL = dict(dim=32, depth=2, heads=4, vocab_size=64, seq_len=8, mem_len=8)


@pytest.fixture
def model():
    return memtx.build("transformer_xl", **SMALL)


@pytest.mark.parametrize(
    "ids,message",
    [
        pytest.param(torch.tensor([[1, 2, -1]]), "token id -1 is outside the vocabulary", id="negative"),
        pytest.param(torch.tensor([[1, 64, 2]]), r"token id 64 is outside the vocabulary \[0, 64\)", id="too-large"),
        pytest.param(torch.zeros(1, 9, dtype=torch.long), "9 tokens is longer than seq_len=8", id="too-long"),
        pytest.param(torch.zeros(8, dtype=torch.long), "shape \\(batch, time\\)", id="1d"),
        pytest.param(torch.zeros(1, 4), "integer token ids", id="float-ids"),
    ],
)
def test_bad_token_ids(model, ids, message):
    with pytest.raises(memtx.InputError, match=message):
        model(ids)


@dataclass(frozen=True)
class OtherState(State):
    slots: torch.Tensor = memory_field("batch", "slot", "dim")


def test_state_from_another_architecture(model):
    other = OtherState(slots=torch.zeros(1, 4, 32))
    with pytest.raises(memtx.StateError, match="carries a FifoMemory, got a OtherState"):
        model(torch.zeros(1, 4, dtype=torch.long), state=other)


def test_state_with_another_batch_size(model):
    state = model(torch.zeros(2, 4, dtype=torch.long)).state
    with pytest.raises(memtx.StateError, match="holds 2 rows but input_ids has batch size 3"):
        model(torch.zeros(3, 4, dtype=torch.long), state=state)


def test_state_with_another_dtype(model):
    state = model(torch.zeros(1, 4, dtype=torch.long)).state.to(torch.float64)
    with pytest.raises(memtx.StateError, match="dtype torch.float64 but the model runs in torch.float32"):
        model(torch.zeros(1, 4, dtype=torch.long), state=state)


def test_state_on_another_device(model):
    state = model(torch.zeros(1, 4, dtype=torch.long)).state.to("meta")
    with pytest.raises(memtx.StateError, match="is on meta but the input is on cpu"):
        model(torch.zeros(1, 4, dtype=torch.long), state=state)


def test_state_from_a_model_with_another_config(model):
    wide = memtx.build("transformer_xl", **{**SMALL, "dim": 48})
    state = wide(torch.zeros(1, 4, dtype=torch.long)).state
    with pytest.raises(memtx.StateError, match="'dim' dimension is 48 but this model expects 32"):
        model(torch.zeros(1, 4, dtype=torch.long), state=state)
    long_mem = memtx.build("transformer_xl", **{**SMALL, "mem_len": 16})
    state = long_mem(torch.zeros(1, 8, dtype=torch.long)).state
    state = long_mem(torch.zeros(1, 8, dtype=torch.long), state=state).state
    with pytest.raises(memtx.StateError, match="'mem' dimension is 16, more than this model's limit 8"):
        model(torch.zeros(1, 4, dtype=torch.long), state=state)


def test_targets_of_the_wrong_shape(model):
    with pytest.raises(memtx.InputError, match="targets must have the shape of input_ids"):
        model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 3, dtype=torch.long))
