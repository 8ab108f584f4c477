"""GateLoop: parity with gateloop-transformer, state carried across segments, streaming."""

from __future__ import annotations

import pytest
import torch

import memtx
from memtx.models.gateloop import cumulative_decay
from memtx.testing import rel_rms

SMALL = dict(dim=16, depth=2, vocab_size=40)

PARITY = [
    pytest.param({}, id="gateloop-1x1-heads"),
    pytest.param({"gate_loop_heads": 4}, id="gateloop-4-heads"),
    pytest.param({"sub_ln": True, "post_ln_norm": True}, id="gateloop-subln-postnorm"),
    pytest.param({"ablate_complex": True}, id="gateloop-ablate-complex"),
    pytest.param({"ablate_state_transition": True}, id="gateloop-ablate-transition"),
    pytest.param({"attn_add_swish_gating": False}, id="gateloop-no-gating"),
    pytest.param({"use_gate_looped_attn": False}, id="full-attn-softmax"),
    pytest.param({"use_gate_looped_attn": False, "rotary_emb": True}, id="full-attn-rotary"),
    pytest.param({"use_gate_looped_attn": False, "attn_softmax_normalize": False}, id="full-attn-unnormalised"),
]


@pytest.mark.parametrize("kwargs", PARITY)
def test_logits_match_the_reference(kwargs):
    reference = pytest.importorskip("gateloop_transformer")
    ref = reference.Transformer(dim=32, num_tokens=50, depth=2, dim_head=16, heads=2, **kwargs).eval()
    model = memtx.from_reference(ref).eval()
    x = torch.randint(0, 50, (2, 37))
    with torch.no_grad():
        assert rel_rms(model(x).logits, ref(x)) < 1e-5


def test_reference_state_dict_round_trip():
    reference = pytest.importorskip("gateloop_transformer")
    ref = reference.Transformer(dim=32, num_tokens=50, depth=2, gate_loop_heads=4)
    model = memtx.from_reference(ref)
    assert model.config.heads == 4 and model.config.dim == 32 and model.config.depth == 2
    assert torch.equal(model.embed.weight, ref.token_emb.weight)


@pytest.mark.parametrize("heads", [pytest.param(None, id="1x1-heads"), pytest.param(4, id="4x4-heads")])
def test_segments_with_state_equal_one_pass(heads):
    """The reference forgets everything at each call; memtx carries the state, so feeding a
    stream segment by segment equals one pass over it."""
    one = memtx.build("gateloop", seq_len=48, heads=heads, **SMALL).eval()
    seg = memtx.build("gateloop", seq_len=16, heads=heads, **SMALL).eval()
    seg.load_state_dict(one.state_dict())
    x = torch.randint(0, 40, (3, 48))
    full = one(x).logits
    state, pieces = None, []
    for start in range(0, 48, 16):
        out = seg(x[:, start:start + 16], state=state)
        state = out.state
        pieces.append(out.logits)
    assert rel_rms(torch.cat(pieces, 1), full) < 1e-5
    # forgetting the state (the reference's behaviour) changes the later segments
    assert rel_rms(seg(x[:, 16:32]).logits[:, :4], full[:, 16:20]) > 1e-2


def test_state_is_zero_when_reset_and_follows_select():
    model = memtx.build("gateloop", seq_len=8, **SMALL).eval()
    x = torch.randint(0, 40, (3, 16))
    state = model(x[:, :8]).state
    assert state.recurrent.abs().sum() > 0
    out = model(x[:, 8:], state=state.reset([1])).logits
    assert rel_rms(out[1:2], model(x[1:2, 8:]).logits) < 1e-6
    swapped = model(x[[2, 0], 8:], state=state.select([2, 0])).logits
    assert rel_rms(swapped, model(x[:, 8:], state=state).logits[[2, 0]]) < 1e-6


def test_ablate_state_transition_is_a_running_sum():
    """With transitions fixed to 1 the mixer is out_t = q_t sum_{s<=t} k_s^T v_s."""
    model = memtx.build("gateloop", seq_len=8, heads=2, dim_inner=8, swish_gating=False,
                        ablate_state_transition=True, **SMALL)
    mixer = model.blocks[0].mixer
    x = torch.randn(1, 8, 16)
    out, _ = mixer(x, None)
    q, k, v = (t.view(1, 8, 2, 4).transpose(1, 2) for t in mixer.to_qkv(x).chunk(3, -1))
    running = torch.cumsum(k[..., :, None] * v[..., None, :], dim=2)  # (B, H, T, Dk, Dv)
    expected = torch.einsum("bhtd,bhtde->bhte", q, running).transpose(1, 2).reshape(1, 8, 8)
    assert rel_rms(out, mixer.to_out(expected)) < 1e-5


def test_frac_gradient_scales_only_the_transition_gradient():
    x = torch.randint(0, 40, (2, 8))
    grads = {}
    for frac in (1.0, 0.25):
        torch.manual_seed(0)
        model = memtx.build("gateloop", seq_len=8, frac_gradient_state_transition=frac, **SMALL)
        model(x, targets=x).loss.backward()
        grads[frac] = {n: p.grad.clone() for n, p in model.named_parameters()}
    last = f"blocks.{SMALL['depth'] - 1}."
    checked = [n for n in grads[1.0] if n.startswith(last) and "mixer_norm" not in n] + ["head.weight"]
    assert any(".to_a." in n for n in checked) and len(checked) > 5
    for name in checked:  # parameters whose gradient reaches them through no other to_a
        ratio = 0.25 if ".to_a." in name else 1.0
        assert torch.allclose(grads[0.25][name], ratio * grads[1.0][name], rtol=1e-4, atol=1e-8), name
    # upstream parameters see the scaled path too, so their gradients do change
    assert not torch.allclose(grads[0.25]["embed.weight"], grads[1.0]["embed.weight"])


@pytest.mark.parametrize("flags,max_saved", [
    # the one-channel recurrence already saves little; a 4x4 state's chunk matrices more
    pytest.param(dict(gradient_checkpointing=True), 0.97, id="recurrence"),
    pytest.param(dict(gradient_checkpointing=True, heads=4), 0.8, id="recurrence-4x4-state"),
    pytest.param(dict(checkpoint_blocks=True), 0.2, id="blocks"),
    pytest.param(dict(checkpoint_blocks=True, gradient_checkpointing=True, heads=4), 0.2,
                 id="blocks-with-recurrence"),
    pytest.param(dict(checkpoint_blocks=True, use_gate_looped_attn=False), 0.2,
                 id="blocks-full-attention"),
])
def test_gradient_checkpointing_gives_the_same_gradients_and_saves_less(flags, max_saved):
    x = torch.randint(0, 40, (2, 12))
    base = {k: v for k, v in flags.items() if k in ("use_gate_looped_attn", "heads")}
    results, saved = [], []
    for overrides in (base, {**base, **flags}):
        torch.manual_seed(0)
        model = memtx.build("gateloop", seq_len=12, **{**SMALL, **overrides})
        state = model.init_state(2)
        if model.config.use_gate_looped_attn:  # a carried state gets its gradient too
            state = type(state)(recurrent=torch.randn_like(state.recurrent).requires_grad_())
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        # tensors kept for backward outside any checkpointed region (checkpoint's own hooks
        # take over inside it)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x, state, targets=x)
        saved.append(total[0])
        (out.loss + out.state.recurrent.abs().sum()).backward()
        grads = [p.grad.flatten() for p in model.parameters()]
        if state.recurrent.requires_grad:
            grads.append(torch.view_as_real(state.recurrent.grad).flatten())
        results.append(torch.cat(grads))
    assert rel_rms(results[1], results[0]) < 1e-6
    assert saved[1] < max_saved * saved[0], saved


def test_complex_gate_matches_its_reference_in_values_and_gradients():
    from memtx.models.gateloop import GateLoopConfig, complex_gate, complex_gate_ref

    cfg = GateLoopConfig(**SMALL, frac_gradient_state_transition=0.7)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 4, 2, generator=g, dtype=torch.float64) * 3
    z[0, 0, 0] = 0.0  # a = 1/2 exactly, gradient 0 (angle is undefined there)
    z[1, 2, 3] = torch.tensor([1e-6, -2e-6])  # tiny |z|: a large but finite gradient
    z.requires_grad_()
    fast, ref = complex_gate(z, cfg), complex_gate_ref(z, cfg)
    assert fast.dtype == ref.dtype == torch.complex128
    assert torch.allclose(fast, ref, atol=1e-12)
    assert fast[0, 0, 0] == 0.5
    weight = torch.randn(fast.shape, generator=g, dtype=torch.complex128)
    g_fast, = torch.autograd.grad((fast * weight).real.sum(), z)
    g_ref, = torch.autograd.grad((ref * weight).real.sum(), z)
    assert torch.isfinite(g_fast).all()
    assert rel_rms(g_fast, g_ref) < 1e-9
    assert torch.equal(g_fast[0, 0, 0], torch.zeros(2, dtype=torch.float64))
    # float32 at tiny |z|: a gradient along z is s'(r) = 1/4 there, with nothing cancelling
    z32 = torch.tensor([[1e-6, 0.0], [0.0, -1e-20]], requires_grad=True)
    cfg1 = GateLoopConfig(**SMALL, frac_gradient_state_transition=1.0)
    radial = z32.detach() / z32.detach().norm(dim=-1, keepdim=True)
    loss = (complex_gate(z32, cfg1) * torch.complex(radial[:, 0], radial[:, 1]).conj()).real.sum()
    g32, = torch.autograd.grad(loss, z32)
    assert torch.allclose((g32 * radial).sum(-1), torch.tensor([0.25, 0.25]), rtol=1e-5)


def test_cumulative_decay_runs_over_time():
    """The reference multiplies transitions over features; memtx over time."""
    log_mag = torch.log(torch.tensor([0.5, 0.8, 0.9]))[None, None, :, None].expand(1, 1, 3, 2)
    phase = torch.zeros(1, 1, 3, 2)
    decay = cumulative_decay(log_mag, phase)
    assert torch.allclose(decay[0, 0, :, 0], torch.tensor([0.5, 0.4, 0.36]))


@pytest.mark.parametrize("heads", [pytest.param(None, id="1x1-heads"), pytest.param(4, id="4x4-heads")])
def test_streaming_equals_recompute(heads):
    model = memtx.build("gateloop", seq_len=6, heads=heads, **SMALL).eval()
    tokens = torch.randint(0, 40, (2, 20))
    stream = model.stream(batch_size=2)
    streamed = torch.cat([stream.feed(tokens[:, t:t + 1]) for t in range(20)], dim=1)
    state, pieces = None, []
    for start in range(0, 20, 6):
        out = model(tokens[:, start:start + 6], state=state)
        state, pieces = out.state, pieces + [out.logits]
    assert rel_rms(streamed, torch.cat(pieces, 1)) < 1e-5
    greedy = memtx.generate(model, tokens[:, :5], 10, temperature=0)
    # naive greedy: full recompute of the whole prefix in 6-token segments
    seq = tokens[:, :5]
    for _ in range(10):
        state, last = None, None
        for start in range(0, seq.shape[1], 6):
            out = model(seq[:, start:start + 6], state=state)
            state, last = out.state, out.logits[:, -1]
        seq = torch.cat((seq, last.argmax(-1, keepdim=True)), 1)
    assert torch.equal(greedy, seq[:, 5:])


def test_bad_config_and_state():
    with pytest.raises(memtx.ConfigError, match="heads=3 must divide dim_inner=16"):
        memtx.build("gateloop", heads=3, **SMALL)
    model = memtx.build("gateloop", seq_len=8, **SMALL)
    other = memtx.build("gateloop", seq_len=8, heads=4, **SMALL)
    state = other(torch.zeros(1, 4, dtype=torch.long)).state
    with pytest.raises(memtx.StateError, match="'heads' dimension is 4 but this model expects 16"):
        model(torch.zeros(1, 4, dtype=torch.long), state=state)


def test_one_channel_heads_run_the_channel_op(monkeypatch):
    import memtx.models.gateloop as gateloop

    calls = []
    real = gateloop.gate_loop_channels
    monkeypatch.setattr(gateloop, "gate_loop_channels",
                        lambda *args: calls.append(args[0].shape) or real(*args))
    model = memtx.build("gateloop", seq_len=8, **SMALL)  # heads default: one channel each
    model(torch.randint(0, 40, (2, 8)))
    assert calls == [torch.Size([2, 8, 16])] * 2
    calls.clear()
    memtx.build("gateloop", seq_len=8, heads=4, **SMALL)(torch.randint(0, 40, (2, 8)))
    assert calls == []  # 4 x 4 states take the chunked form


def test_checkpoint_blocks_does_not_also_checkpoint_the_recurrence(monkeypatch):
    import memtx.models.gateloop as gateloop

    names = []
    real = gateloop.checkpoint

    def recording(fn, *args, **kwargs):
        names.append(getattr(fn, "__name__", type(fn).__name__))
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(gateloop, "checkpoint", recording)
    for heads in (None, 4):
        names.clear()
        model = memtx.build("gateloop", seq_len=8, heads=heads, checkpoint_blocks=True,
                            gradient_checkpointing=True, **SMALL)
        x = torch.randint(0, 40, (2, 8))
        model(x, targets=x).loss.backward()
        assert names == ["GateLoopBlock"] * 2, names


def test_complex_gate_takes_strided_input_and_refuses_double_backward():
    from memtx.models.gateloop import GateLoopConfig, complex_gate, complex_gate_ref

    cfg = GateLoopConfig(seq_len=8, **SMALL)
    z = torch.randn(2, 7, dtype=torch.float64).t().requires_grad_()  # (7, 2), strides (1, 7)
    assert torch.allclose(complex_gate(z, cfg), complex_gate_ref(z, cfg), atol=1e-12)
    (grad,) = torch.autograd.grad(complex_gate(z, cfg).real.sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable|twice"):
        grad.sum().backward()
