"""The generic state base: select, reset, detach, to, pytree and serialisation."""

from __future__ import annotations

import io

import pytest
import torch
import torch.utils._pytree as pytree

from memtx.errors import StateError
from memtx.state import FifoMemory, append_to_fifo


def _state(batch=3, mem=4, layers=2, dim=5):
    mem_t = torch.arange(layers * batch * mem * dim, dtype=torch.float32).view(layers, batch, mem, dim)
    valid = torch.ones(batch, mem, dtype=torch.bool)
    valid[1, :2] = False
    return FifoMemory(mem=mem_t, valid=valid)


def test_select_reorders_rows_in_every_field():
    s = _state()
    picked = s.select([2, 0])
    assert torch.equal(picked.mem, s.mem[:, [2, 0]])
    assert torch.equal(picked.valid, s.valid[[2, 0]])
    assert picked.batch_size == 2
    masked = s.select(torch.tensor([False, True, True]))
    assert torch.equal(masked.mem, s.mem[:, [1, 2]])


def test_reset_clears_only_the_given_rows_and_leaves_the_original_alone():
    s = _state()
    before = s.mem.clone()
    cleared = s.reset([0])
    assert torch.equal(cleared.mem[:, 0], torch.zeros_like(s.mem[:, 0]))
    assert not cleared.valid[0].any()
    assert torch.equal(cleared.mem[:, 1:], s.mem[:, 1:])
    assert torch.equal(cleared.valid[1:], s.valid[1:])
    assert torch.equal(s.mem, before)  # never modified in place
    assert torch.equal(s.reset(torch.tensor([True, False, False])).mem, cleared.mem)


def test_detach_and_to_keep_masks_boolean():
    s = FifoMemory(mem=torch.randn(1, 2, 3, 4, requires_grad=True) * 2,
                   valid=torch.ones(2, 3, dtype=torch.bool))
    assert s.mem.requires_grad and not s.detach().mem.requires_grad
    s64 = s.to(torch.float64)
    assert s64.mem.dtype == torch.float64 and s64.valid.dtype == torch.bool


def test_pytree_round_trip():
    s = _state()
    leaves, spec = pytree.tree_flatten(s)
    assert len(leaves) == 2
    doubled = pytree.tree_unflatten([t * 2 if t.is_floating_point() else t for t in leaves], spec)
    assert isinstance(doubled, FifoMemory)
    assert torch.equal(doubled.mem, s.mem * 2)


def test_serialisation_round_trips_without_pickle():
    s = _state()
    buffer = io.BytesIO()
    torch.save(s.to_tensors("state."), buffer)
    buffer.seek(0)
    loaded = FifoMemory.from_tensors(torch.load(buffer, weights_only=True), "state.")
    assert loaded.equal(s)


def test_fields_that_disagree_are_rejected():
    bad = FifoMemory(mem=torch.zeros(2, 3, 4, 5), valid=torch.ones(3, 7, dtype=torch.bool))
    with pytest.raises(StateError, match="'mem' dimension is 4 in mem but 7 in valid"):
        bad.sizes()
    with pytest.raises(StateError, match="out of range"):
        _state().select([5])


@pytest.mark.parametrize("stored, length, keep", [
    (0, 4, 6), (0, 4, 4), (0, 4, 2), (3, 4, 6), (5, 4, 6), (6, 4, 6), (6, 8, 6), (2, 4, 0),
])
def test_append_to_fifo_keeps_the_last_positions_and_copies_only_those(stored, length, keep):
    g = torch.Generator().manual_seed(stored * 100 + length * 10 + keep)
    mem = torch.randn(2, 3, stored, 5, generator=g)
    valid = torch.rand(3, stored, generator=g) > 0.3
    new = torch.randn(2, 3, length, 5, generator=g)
    out_mem, out_valid = append_to_fifo(mem, valid, new, keep)
    kept = min(keep, stored + length)
    both = torch.cat((mem, new), dim=2)
    both_valid = torch.cat((valid, torch.ones(3, length, dtype=torch.bool)), dim=1)
    assert torch.equal(out_mem, both[:, :, both.shape[2] - kept:])
    assert torch.equal(out_valid, both_valid[:, both.shape[2] - kept:])
    # a compact tensor of its own: no view that keeps all stored + length positions alive
    assert out_mem.untyped_storage().nbytes() == out_mem.numel() * out_mem.element_size()
