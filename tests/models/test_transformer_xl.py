"""Transformer-XL: segment recurrence, memory semantics, loss, parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memtx
from memtx.testing import rel_rms

SMALL = dict(dim=32, depth=2, heads=4, vocab_size=64)


def _pair(seq_len, mem_len, **kw):
    """A segmented model and a one-pass model (seq_len doubled, no memory) with equal weights."""
    seg = memtx.build("transformer_xl", seq_len=seq_len, mem_len=mem_len, **SMALL, **kw).eval()
    one = memtx.build("transformer_xl", seq_len=2 * seq_len, mem_len=0, **SMALL, **kw).eval()
    one.load_state_dict(seg.state_dict())
    return seg, one


@pytest.mark.parametrize("mem_len", [pytest.param(8, id="M=T"), pytest.param(20, id="M>T")])
def test_two_segments_equal_one_pass(mem_len):
    seg, one = _pair(seq_len=8, mem_len=mem_len)
    x = torch.randint(0, 64, (3, 16))
    full = one(x).logits
    first = seg(x[:, :8])
    second = seg(x[:, 8:], state=first.state)
    assert rel_rms(torch.cat((first.logits, second.logits), 1), full) < 1e-5
    # the memory matters: without it the second segment's logits differ
    alone = seg(x[:, 8:]).logits
    assert rel_rms(alone, full[:, 8:]) > 1e-2


def test_short_memory_limits_the_context():
    """With mem_len < T the second segment sees only the last mem_len old positions, so it
    equals one pass only for the first query and the memory holds exactly mem_len entries."""
    seg, _ = _pair(seq_len=8, mem_len=3)
    x = torch.randint(0, 64, (2, 16))
    state = seg(x[:, :8]).state
    assert state.mem.shape == (2, 2, 3, 32)
    # memory = layer inputs of positions 5, 6, 7: check layer 0 (embeddings)
    assert torch.allclose(state.mem[0], seg.embed(x[:, 5:8]))


def test_segment_shorter_than_seq_len():
    seg, one = _pair(seq_len=8, mem_len=8)
    x = torch.randint(0, 64, (2, 13))
    first = seg(x[:, :8])
    second = seg(x[:, 8:], state=first.state)  # 5 < seq_len tokens
    assert second.logits.shape == (2, 5, 64)
    assert rel_rms(second.logits, one(x).logits[:, 8:]) < 1e-5


def test_memory_is_a_stop_gradient_and_never_modified():
    model = memtx.build("transformer_xl", seq_len=8, mem_len=8, **SMALL)
    x = torch.randint(0, 64, (2, 16))
    first = model(x[:, :8])
    saved = first.state.mem.clone()
    assert not first.state.mem.requires_grad
    out = model(x[:, 8:], state=first.state, targets=x[:, 8:])
    out.loss.backward()
    assert torch.equal(first.state.mem, saved)
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_reset_rows_behave_like_a_fresh_stream():
    model = memtx.build("transformer_xl", seq_len=8, mem_len=16, **SMALL).eval()
    x = torch.randint(0, 64, (3, 16))
    state = model(x[:, :8]).state.reset([1])
    out = model(x[:, 8:], state=state).logits
    fresh = model(x[1:2, 8:]).logits
    assert rel_rms(out[1:2], fresh) < 1e-5
    kept = model(x[:, 8:], state=model(x[:, :8]).state).logits
    assert rel_rms(out[[0, 2]], kept[[0, 2]]) < 1e-6
    # a third segment after the reset: row 1 equals a fresh stream started at segment 2
    out3 = model(x[:, :8], state=model(x[:, 8:], state=state).state).logits
    fresh3 = model(x[1:2, :8], state=model(x[1:2, 8:]).state).logits
    assert rel_rms(out3[1:2], fresh3) < 1e-5


def test_select_moves_memory_with_its_row():
    model = memtx.build("transformer_xl", seq_len=8, mem_len=8, **SMALL).eval()
    x = torch.randint(0, 64, (3, 16))
    state = model(x[:, :8]).state
    swapped = model(x[[2, 0], 8:], state=state.select([2, 0])).logits
    straight = model(x[:, 8:], state=state).logits
    assert rel_rms(swapped, straight[[2, 0]]) < 1e-6


def test_loss_is_mean_cross_entropy_over_scored_targets():
    model = memtx.build("transformer_xl", seq_len=8, mem_len=8, **SMALL)
    x = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    targets[0, :3] = memtx.IGNORE_INDEX
    out = model(x, targets=targets)
    keep = targets != memtx.IGNORE_INDEX
    expected = F.cross_entropy(out.logits[keep], targets[keep])
    assert torch.allclose(out.loss, expected)
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0
    assert model(x).loss is None


def test_embeddings_tied_or_not():
    tied = memtx.build("transformer_xl", **SMALL)
    untied = memtx.build("transformer_xl", tie_embeddings=False, **SMALL)
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    assert untied.num_parameters() - tied.num_parameters() == 64 * 32


def test_dropout_only_in_training():
    model = memtx.build("transformer_xl", dropout=0.3, attn_dropout=0.3, **SMALL)
    x = torch.randint(0, 64, (2, 8))
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)


def test_memory_disabled():
    model = memtx.build("transformer_xl", seq_len=8, mem_len=0, **SMALL).eval()
    x = torch.randint(0, 64, (2, 16))
    state = model(x[:, :8]).state
    assert state.mem.shape[2] == 0
    assert torch.equal(model(x[:, 8:], state=state).logits, model(x[:, 8:]).logits)
