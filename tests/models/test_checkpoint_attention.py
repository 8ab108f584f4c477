"""``checkpoint_attention``: the attention weights are rebuilt in backward, results unchanged."""

from __future__ import annotations

import pytest
import torch

import memtx
from memtx.testing import rel_rms

SIZES = dict(dim=32, depth=2, heads=4, seq_len=8, mem_len=8)
EXTRA = {"transformer_xl": {}, "compressive": dict(cmem_len=4, compress_ratio=2)}


def _saved_bytes(model, tokens, state):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        out = model(tokens, state, targets=tokens)
    return out, sum(saved)


@pytest.mark.parametrize("arch", list(EXTRA))
@pytest.mark.parametrize("attn_dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_same_losses_and_gradients_with_less_kept_for_backward(arch, attn_dropout):
    torch.manual_seed(0)
    plain = memtx.build(arch, **SIZES, **EXTRA[arch], attn_dropout=attn_dropout)
    ckpt = memtx.build(arch, **SIZES, **EXTRA[arch], attn_dropout=attn_dropout,
                       checkpoint_attention=True)
    ckpt.load_state_dict(plain.state_dict())
    plain, ckpt = plain.double(), ckpt.double()  # so that rounding differences stay ~1e-16
    tokens = torch.randint(0, 256, (2, 3 * 8))
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # the same dropout masks
        state, losses, kept = None, [], 0
        for s in range(3):  # the memory fills, so the later segments attend over it
            out, saved = _saved_bytes(model, tokens[:, 8 * s: 8 * s + 8], state)
            state, kept = out.state.detach(), kept + saved
            losses.append(out.loss + out.aux_loss)
        torch.stack(losses).sum().backward()
        results.append((torch.stack(losses).detach(), kept))
    (loss, kept), (loss_ckpt, kept_ckpt) = results
    assert torch.allclose(loss, loss_ckpt, rtol=0, atol=1e-12)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.grad is not None:
            assert rel_rms(b.grad, a.grad) < 1e-9, name
    assert kept_ckpt < kept
