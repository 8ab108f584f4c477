"""model(..., detach_state=True): the same logits, losses and gradients, the next state detached,
and for models whose state update has a graph of its own, nothing kept for it."""

from __future__ import annotations

import pytest
import torch

import memtx

SMALL = dict(dim=16, depth=2, heads=2, vocab_size=32, seq_len=8)
MODELS = [
    pytest.param("transformer_xl", dict(mem_len=8), id="transformer_xl"),
    pytest.param("compressive", dict(mem_len=8, cmem_len=4, compress_ratio=2), id="compressive"),
    pytest.param("memory_xl", dict(mem_len=8, lmem_len=4), id="memory_xl"),
    pytest.param("expire_span", dict(mem_len=8, max_span=16, ramp_len=2), id="expire_span"),
    pytest.param("gateloop", dict(), id="gateloop"),
    pytest.param("memformer", dict(num_memory_slots=3), id="memformer"),
]
# the models whose next state is written by parameters the segment's loss does not reach
OWN_GRAPH = {"memory_xl", "memformer"}


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("arch,overrides", MODELS)
def test_detach_state_changes_nothing_but_the_graph_of_the_next_state(arch, overrides):
    model = memtx.build(arch, **SMALL, **overrides).train()
    tokens = torch.randint(0, 32, (2, 3 * 8 + 1))
    state = None
    with torch.no_grad():  # a state with every memory filled
        for start in (0, 8):
            state = model(tokens[:, start:start + 8], state).state
    inputs, targets = tokens[:, 16:24], tokens[:, 17:25]
    params = [p for p in model.parameters() if p.requires_grad]

    results = {}
    for detach in (False, True):
        torch.manual_seed(1)  # the same dropout masks, if any
        out, saved = _saved_bytes(lambda: model(inputs, state, targets, detach_state=detach))
        loss = out.loss + out.aux_loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results[detach] = (out, saved, grads)

    (plain, saved_plain, grads_plain), (detached, saved_detached, grads_detached) = (
        results[False], results[True])
    assert torch.equal(plain.logits, detached.logits)
    assert torch.equal(plain.loss, detached.loss)
    for (name, a, _), (_, b, _) in zip(plain.state.items(), detached.state.items()):
        assert not b.requires_grad, f"state field {name} still has a graph"
        assert torch.equal(a.detach(), b)
    for a, b in zip(grads_plain, grads_detached):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    if arch in OWN_GRAPH:  # (a quarter to a third of what these tiny models keep)
        assert any(t.requires_grad for _, t, _ in plain.state.items())
        assert saved_detached < 0.8 * saved_plain
    else:
        assert saved_detached <= saved_plain


def test_detach_state_is_off_again_after_a_failed_forward(monkeypatch):
    model = memtx.build("memory_xl", **SMALL, mem_len=8, lmem_len=4)
    real = model.forward_segment

    def failing(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "forward_segment", failing)
    with pytest.raises(RuntimeError):
        model(torch.randint(0, 32, (1, 8)), detach_state=True)
    with model.state_update():  # outside forward it changes nothing
        assert torch.is_grad_enabled()
    monkeypatch.setattr(model, "forward_segment", real)
    out = model(torch.randint(0, 32, (1, 8)))
    assert out.state.lmem.requires_grad


def test_forward_segments_detaches_only_the_state_after_the_last_segment():
    model = memtx.build("memory_xl", **SMALL, mem_len=8, lmem_len=4)
    tokens = torch.randint(0, 32, (2, 3 * 8))
    plain = memtx.forward_segments(model, tokens, targets=tokens)
    detached = memtx.forward_segments(model, tokens, targets=tokens, detach_state=True)
    assert torch.equal(plain.logits, detached.logits) and torch.equal(plain.loss, detached.loss)
    assert plain.state.lmem.requires_grad and not detached.state.lmem.requires_grad
    # the earlier segments' writes still reach the loss: the writer gets a gradient
    detached.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.writer.parameters())
