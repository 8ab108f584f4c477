"""Memory replay back-propagation: the same gradients as full backprop through time."""

from __future__ import annotations

import pytest
import torch

import memtx
from memtx.training.mrbp import mrbp

SMALL = dict(dim=16, depth=2, heads=2, vocab_size=24, seq_len=6)
MEMFORMER = dict(num_memory_slots=3, mem_update_heads=2, num_mem_updates=2)


def _bptt(model, segments, state=None):
    """Full backprop through time: one graph over every segment, mean CE over scored targets
    plus the mean auxiliary loss; returns (objective, final state)."""
    ce_sum, count, aux = 0.0, 0, 0.0
    for seg in segments:
        inputs, targets = seg[0], seg[1]
        if len(seg) == 3 and seg[2] is not None:
            state = state.reset(seg[2])
        out = model(inputs, state, targets)
        state = out.state
        aux = aux + out.aux_loss
        if targets is not None:
            scored = targets != memtx.IGNORE_INDEX
            ce_sum = ce_sum + out.loss * scored.sum()
            count += int(scored.sum())
    objective = ce_sum / count + aux / len(segments)
    objective.backward()
    return objective, state


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _segments(num, batch=2, targets_every=True):
    segs = []
    for i in range(num):
        x = torch.randint(0, 24, (batch, 6))
        y = torch.randint(0, 24, (batch, 6))
        y[0, :2] = memtx.IGNORE_INDEX
        segs.append((x, y if targets_every or i == num - 1 else None))
    return segs


def _compare(model, segments):
    mrbp_result = mrbp(model, segments)
    replayed = _grads(model)
    model.zero_grad(set_to_none=True)
    objective, state = _bptt(model, segments, model.init_state(segments[0][0].shape[0]))
    full = _grads(model)
    assert replayed.keys() == full.keys() and full
    worst = max(
        float((replayed[n] - full[n]).norm() / full[n].norm().clamp(min=1e-300)) for n in full
    )
    assert worst < 1e-10, worst
    # the loss itself is float32 (lm_loss computes in fp32): only the summation order differs
    assert abs(mrbp_result.objective.item() - objective.item()) < 1e-6 * objective.item()
    for (name, replayed_t, _), (_, full_t, _) in zip(mrbp_result.state.items(), state.items()):
        assert torch.allclose(replayed_t, full_t.detach(), rtol=1e-12, atol=1e-14), name
    assert not any(t.requires_grad for _, t, _ in mrbp_result.state.items())
    return replayed


@pytest.mark.parametrize(
    "num,targets_every",
    [pytest.param(4, True, id="4-segments-targets-every"),
     pytest.param(3, False, id="3-segments-target-last")],
)
def test_memformer_gradients_equal_full_bptt(num, targets_every):
    model = memtx.build("memformer", **SMALL, **MEMFORMER).double()
    grads = _compare(model, _segments(num, targets_every=targets_every))
    # the writer and the learned slots are trained through the memory
    assert grads["writer.gru.weight_ih"].abs().sum() > 0
    assert grads["memory_slots"].abs().sum() > 0


def test_resets_inside_the_replayed_segments():
    model = memtx.build("memformer", **SMALL, **MEMFORMER).double()
    segments = _segments(3)
    segments[1] = (*segments[1], torch.tensor([True, False]))
    _compare(model, segments)


def test_writer_gradient_comes_only_through_later_segments():
    """Targets on the last segment only: the writer's gradient is non-zero, so it came from the
    memory written by earlier segments (the last segment's own write feeds no loss)."""
    model = memtx.build("memformer", **SMALL, **MEMFORMER).double()
    mrbp(model, _segments(3, targets_every=False))
    assert model.writer.ff.w2.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    mrbp(model, _segments(1))
    assert model.writer.ff.w2.weight.grad is None


def test_dropout_masks_are_replayed():
    """A model with dropout: the replay restores the RNG, so gradients still equal BPTT's."""
    model = memtx.build("transformer_xl", mem_len=6, dropout=0.3, **SMALL).double().train()
    segments = _segments(3)
    torch.manual_seed(5)
    mrbp(model, segments)
    after_mrbp = torch.rand(1)
    replayed = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    _bptt(model, segments, model.init_state(2))
    assert torch.equal(torch.rand(1), after_mrbp)  # the generator ends where BPTT leaves it
    full = _grads(model)
    assert all(torch.allclose(replayed[n], full[n], rtol=1e-10, atol=1e-14) for n in full)


def test_gradients_accumulate_and_scales_apply():
    model = memtx.build("memformer", **SMALL, **MEMFORMER).double()
    segments = _segments(2)
    result = mrbp(model, segments)
    once = _grads(model)
    mrbp(model, segments, ce_scale=2.0 / result.num_scored)  # adds twice the gradient
    assert all(torch.allclose(p.grad, 3 * once[n], rtol=1e-10) for n, p in model.named_parameters())
    assert result.num_scored == 2 * 12 - 2 * 2
    assert abs(result.loss_sum.item() / result.num_scored - result.objective.item()) < 1e-6


def test_no_segments_is_an_error():
    model = memtx.build("memformer", **SMALL, **MEMFORMER)
    with pytest.raises(memtx.InputError, match="at least one segment"):
        mrbp(model, [])
