"""Expire-Span: masks, renormalised attention, expiry, variable per-row memories, streaming."""

from __future__ import annotations

import io

import pytest
import torch

import memtx
from memtx.models.expire_span import (
    ExpireSpanMemory,
    expire_mask,
    LOG_ZERO,
    log_expire_mask,
    log_mask,
    ramp_counts,
)
from memtx.ops.position import sinusoid
from memtx.testing import rel_rms

SMALL = dict(dim=32, depth=2, heads=4, vocab_size=64)


def _build(depth=2, **kw):
    return memtx.build("expire_span", **{**SMALL, "depth": depth, **kw})


def _vary_spans(model, scale=0.4, bias=0.0):
    """Span predictors that give every entry its own span, spread over (0, max_span)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for predictor in model.span_predictors:
            predictor.weight.copy_(torch.randn(predictor.weight.shape, generator=g) * scale)
            predictor.bias.fill_(bias)
    return model


def _force_spans(model, logit):
    with torch.no_grad():
        for predictor in model.span_predictors:
            predictor.weight.zero_()
            predictor.bias.fill_(logit)
    return model


def _run(model, tokens, state=None):
    seq_len = model.config.seq_len
    logits = []
    for start in range(0, tokens.shape[1], seq_len):
        out = model(tokens[:, start : start + seq_len], state)
        logits.append(out.logits)
        state = out.state
    return torch.cat(logits, 1), state


# -- masks and renormalised attention against a per-pair reference ----------------------------
def _naive_logits(model, tokens, state, renormalise=True):
    """One segment of a depth-1 model, pair by pair: the mask of every (query, key) pair from
    its distance and span, softmax, times the mask, then (or not, as the seed) renormalised."""
    cfg = model.config
    block, predictor = model.blocks[0], model.span_predictors[0]
    attn = block.attn
    heads, head_dim = attn.heads, attn.head_dim
    x = model.embed(tokens)
    out = torch.zeros_like(x)
    in_ramp = 0
    for b in range(x.shape[0]):
        keys = [(state.mem[0, b, m], int(state.age[0, b, m]))
                for m in range(state.mem.shape[2]) if state.valid[0, b, m]]
        keys += [(x[b, j], -j) for j in range(x.shape[1])]  # distance to query i: i - j
        for i in range(x.shape[1]):
            q = attn.to_q(block.attn_norm(x[b, i])).view(heads, head_dim)
            scores, masks, values = [], [], []
            for h, age in keys:
                distance = age + i
                if distance < 0:  # a later position of the segment
                    continue
                hn = block.attn_norm(h)
                k, v = attn.to_kv(hn).view(2, heads, head_dim)
                r = attn.to_r(sinusoid(torch.tensor([distance]), cfg.dim)[0]).view(heads, head_dim)
                content = ((q + attn.content_bias) * k).sum(-1)
                position = ((q + attn.position_bias) * r).sum(-1)
                scores.append((content + position) * attn.scale)
                span = cfg.max_span * torch.sigmoid(predictor(hn)[0])
                mask = torch.clamp(1 + (span - distance) / cfg.ramp_len, 0, 1)
                in_ramp += int(0 < mask < 1)
                masks.append(mask)
                values.append(v)
            weights = torch.stack(scores, -1).softmax(-1) * torch.stack(masks)  # (H, K)
            if renormalise:
                weights = weights / weights.sum(-1, keepdim=True)
            heads_out = (weights[..., None] * torch.stack(values, 1)).sum(1)  # (H, D)
            out[b, i] = attn.to_out(heads_out.flatten())
    x = x + out
    x = x + block.ff(block.ff_norm(x))
    return model.head(model.norm(x)), in_ramp


def test_masks_and_renormalised_attention_match_a_per_pair_reference():
    model = _vary_spans(_build(depth=1, seq_len=4, mem_len=10, max_span=8, ramp_len=3)).eval()
    tokens = torch.randint(0, 64, (3, 16))
    _, state = _run(model, tokens[:, :12])
    assert len(set(state.held()[0].tolist())) > 1  # rows keep different numbers of entries
    logits = model(tokens[:, 12:], state).logits
    with torch.no_grad():
        expected, in_ramp = _naive_logits(model, tokens[:, 12:], state)
        seed_like, _ = _naive_logits(model, tokens[:, 12:], state, renormalise=False)
    assert in_ramp > 5  # the soft part of the mask is exercised
    assert rel_rms(logits, expected) < 1e-5
    assert rel_rms(logits, seed_like) > 1e-3  # multiplying after softmax alone is not the same


def test_mask_formula():
    spans = torch.tensor([[10.0, 2.5]])
    distances = torch.tensor([[[9, 0], [10, 3], [12, 4], [14, 6], [15, 7]]])
    mask = expire_mask(spans, distances, ramp_len=4)
    expected = torch.tensor([[[1.0, 1.0], [1.0, 0.875], [0.5, 0.625], [0.0, 0.125], [0.0, 0.0]]])
    assert torch.allclose(mask, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_log_mask_is_log_with_a_finite_zero_that_still_gets_no_weight(dtype):
    mask = torch.tensor([0.0, 1e-30, 0.125, 0.5, 1.0, 0.0, 0.75], dtype=torch.float64).to(dtype)
    out = log_mask(mask)
    assert torch.equal(out[mask > 0], mask[mask > 0].log())
    assert (out[mask == 0] == LOG_ZERO).all() if dtype != torch.bfloat16 else (out[mask == 0] < -1e29).all()
    scores = torch.randn(7, dtype=torch.float64).to(dtype) * 30
    weights = (scores + out).float().softmax(-1)
    assert torch.equal(weights == 0, mask == 0)  # the same pairs as with -inf, exactly
    if dtype != torch.bfloat16:  # (bfloat16 rounds the scores' sum with the bias)
        expected = mask.float() * scores.float().exp()
        assert torch.allclose(weights, expected / expected.sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("first_query", [pytest.param(0, id="segment-start"), pytest.param(3, id="streaming")])
def test_log_mask_and_ramp_counts_match_the_pairwise_mask(first_query):
    batch, keys, queries, ramp = 2, 9, 5, 3
    spans = (torch.rand(batch, keys, dtype=torch.float64) * 8).requires_grad_()
    base = torch.randint(-4, 10, (batch, keys))
    valid = torch.rand(batch, keys) > 0.2
    distances = base[:, None, :] + torch.arange(first_query, first_query + queries)[None, :, None]
    mask = expire_mask(spans, distances, ramp) * valid[:, None, :]
    fast = log_expire_mask(spans, base, valid, first_query, queries, ramp)
    assert torch.equal(fast == LOG_ZERO, mask == 0)  # finite: softmax weight exactly 0 there
    assert rel_rms(fast.exp(), mask) < 1e-12
    weight = torch.rand(batch, queries, keys, dtype=torch.float64)
    (grad,) = torch.autograd.grad((fast.exp() * weight).sum(), [spans])
    (expected,) = torch.autograd.grad((mask * weight).sum(), [spans], retain_graph=True)
    assert rel_rms(grad, expected) < 1e-12
    # integer spans put pairs exactly on the ramp's ends (m = 0): the gradient of log m there
    # is 0, never NaN
    whole = spans.detach().round().requires_grad_()
    exact = log_expire_mask(whole, base, valid, first_query, queries, ramp)
    assert (exact.exp() == 0).any()
    (grad,) = torch.autograd.grad(exact.masked_fill(exact == LOG_ZERO, 0).sum(), [whole])
    assert torch.isfinite(grad).all()
    in_ramp = ((mask > 0) & (mask < 1) & (distances >= 0)).sum(1)
    assert in_ramp.sum() > 5
    assert torch.equal(ramp_counts(spans, base, valid, first_query, queries, ramp), in_ramp.double())


# -- spans at the maximum: exactly Transformer-XL ----------------------------------------------
@pytest.mark.parametrize(
    "seq_len,mem_len", [pytest.param(8, 8, id="M=T"), pytest.param(6, 14, id="M>T"), pytest.param(8, 3, id="M<T")]
)
def test_spans_forced_to_max_equal_transformer_xl(seq_len, mem_len):
    xl = memtx.build("transformer_xl", seq_len=seq_len, mem_len=mem_len, **SMALL).eval()
    model = _build(seq_len=seq_len, mem_len=mem_len, max_span=mem_len + seq_len - 1, ramp_len=2).eval()
    missing = model.load_state_dict(xl.state_dict(), strict=False).missing_keys
    assert all(name.startswith("span_predictors.") for name in missing)
    _force_spans(model, 40.0)  # sigmoid(40) == 1 in fp32: every span is max_span
    tokens = torch.randint(0, 64, (3, 4 * seq_len))
    logits, state = _run(model, tokens)
    xl_logits, xl_state = _run(xl, tokens)
    assert rel_rms(logits, xl_logits) < 1e-6
    # the same math through different attention kernels: equal up to float rounding
    assert rel_rms(state.mem, xl_state.mem) < 1e-6
    assert state.valid.all()
    assert torch.equal(state.age[0, 0], torch.arange(mem_len, 0, -1))


# -- expiry ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mem_len,max_span,ramp_len",
    [pytest.param(32, 12, 3, id="spans-decide"), pytest.param(5, 12, 3, id="cap-decides"),
     pytest.param(32, 6, 6, id="ramp=max_span")],
)
def test_entries_expire_exactly_when_their_span_says(mem_len, max_span, ramp_len):
    """Layer 0 stores the embeddings, so a per-row simulation of the rule (keep an entry while
    e + R - age > 0, then the newest mem_len) predicts its memory exactly."""
    seq_len, batch = 4, 3
    model = _vary_spans(_build(seq_len=seq_len, mem_len=mem_len, max_span=max_span, ramp_len=ramp_len)).eval()
    tokens = torch.randint(0, 64, (batch, 6 * seq_len))
    with torch.no_grad():
        normed = model.blocks[0].attn_norm(model.embed(tokens))
        spans = model.spans(0, normed)
        explicit = max_span * torch.sigmoid(normed @ model.span_predictors[0].weight[0]
                                            + model.span_predictors[0].bias)
    assert torch.allclose(spans, explicit)
    assert spans.std() > 0.2 * max_span  # entries differ in span
    state = None
    entries = [[] for _ in range(batch)]  # per row: absolute positions kept, oldest first
    for end in range(seq_len, tokens.shape[1] + 1, seq_len):
        state = model(tokens[:, end - seq_len : end], state).state
        for b in range(batch):
            kept = [p for p in entries[b] + list(range(end - seq_len, end))
                    if spans[b, p] + ramp_len - (end - p) > 0]
            entries[b] = kept[-mem_len:] if len(kept) > mem_len else kept
            held = int(state.valid[0, b].sum())
            assert held == len(entries[b])
            assert not state.valid[0, b, : state.mem.shape[2] - held].any()  # left padding
            ages = state.age[0, b, state.mem.shape[2] - held :]
            assert ages.tolist() == [end - p for p in entries[b]]
            assert torch.equal(state.mem[0, b, state.mem.shape[2] - held :],
                               model.embed(tokens[b, entries[b]]))
        assert state.mem.shape[2] == int(state.held().max())  # trimmed to the longest row
        for layer in range(2):  # each layer attends only over its own longest row
            assert model.layer_memory(state, layer).age.shape[1] == int(state.held()[layer].max())
    if mem_len < max_span + ramp_len - 1:
        assert state.held().max() == mem_len  # the cap binds
    else:
        assert state.held().max() < max_span + ramp_len - 1  # the spans shrank the memory


def test_batch_larger_than_memory_keeps_every_row():
    """The seed trims elapsed times with t[-max_mem_len:], which slices the batch: with more
    rows than entries it loses rows. Here every row keeps its own newest entries."""
    model = _force_spans(_build(seq_len=4, mem_len=3, max_span=8, ramp_len=2), 40.0).eval()
    tokens = torch.randint(0, 64, (5, 8))
    _, state = _run(model, tokens)
    assert state.age.shape == (2, 5, 3) and state.valid.all()
    assert torch.equal(state.age[:, :, :], torch.tensor([3, 2, 1]).expand(2, 5, 3))
    assert torch.equal(state.mem[0], model.embed(tokens[:, 5:]))


# -- initialisation and training of the span predictor ----------------------------------------
def test_initial_spans_are_a_tenth_of_max_span_and_both_losses_train_them():
    model = _build(seq_len=8, mem_len=64, max_span=40, ramp_len=4, span_loss_coef=1e-2)
    tokens = torch.randint(0, 64, (2, 24))
    state = model(tokens[:, :8]).state.detach()
    state = model(tokens[:, 8:16], state).state.detach()
    memory = model.layer_memory(state, 0)
    assert torch.allclose(memory.spans, torch.full_like(memory.spans, 4.0))
    # the seed's bias -max_span gives spans of exactly 0 and no gradient: this would fail
    out = model(tokens[:, 16:], state, targets=tokens[:, 16:])
    assert out.aux_loss > 0
    predictor = model.span_predictors[0]
    lm_grads = torch.autograd.grad(out.loss, list(predictor.parameters()), retain_graph=True)
    aux_grads = torch.autograd.grad(out.aux_loss, list(predictor.parameters()))
    for grad in (*lm_grads, *aux_grads):
        assert grad.abs().sum() > 0
    assert aux_grads[1] > 0  # the span loss pushes spans down


def test_span_loss_counts_pairs_in_the_ramp():
    model = _vary_spans(_build(depth=1, seq_len=4, mem_len=16, max_span=8, ramp_len=3,
                               span_loss_coef=0.5))
    tokens = torch.randint(0, 64, (2, 12))
    state = model(tokens[:, 4:8], model(tokens[:, :4]).state).state
    out = model(tokens[:, 8:], state)
    with torch.no_grad():
        memory = model.layer_memory(state, 0)
        x_spans = model.spans(0, model.blocks[0].attn_norm(model.embed(tokens[:, 8:])))
    expected = 0.0
    for b in range(2):
        keys = [(float(memory.spans[b, m]), int(memory.age[b, m]))
                for m in range(memory.age.shape[1]) if memory.valid[b, m]]
        keys += [(float(x_spans[b, j]), -j) for j in range(4)]
        for i in range(4):
            for span, age in keys:
                mask = 1 + (span - (age + i)) / 3
                if age + i >= 0 and 0 < mask < 1:
                    expected += span
    expected *= 0.5 / (3 * 4 * 2)
    assert expected > 0
    assert abs(out.aux_loss.item() - expected) < 1e-5 * expected


def test_memory_is_a_stop_gradient_and_never_modified():
    model = _vary_spans(_build(seq_len=4, mem_len=8, max_span=8, ramp_len=2))
    tokens = torch.randint(0, 64, (2, 8))
    first = model(tokens[:, :4])
    saved = {name: t.clone() for name, t, _ in first.state.items()}
    assert not first.state.mem.requires_grad
    out = model(tokens[:, 4:], first.state, targets=tokens[:, 4:])
    (out.loss + out.aux_loss).backward()
    for name, t, _ in first.state.items():
        assert torch.equal(t, saved[name])
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_random_shortening_hides_memory_but_never_expires_it():
    """The seed multiplies its forget mask into the expiry mask in place, so training throws
    memory away for good; here shortening changes what a segment sees, not what is kept (one
    layer, whose memory holds embeddings, so the kept entries can be compared exactly)."""
    plain = _vary_spans(_build(depth=1, seq_len=4, mem_len=16, max_span=12, ramp_len=3)).train()
    short = _build(depth=1, seq_len=4, mem_len=16, max_span=12, ramp_len=3, shorten_prob=1.0).train()
    short.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 64, (4, 12))
    _, state = _run(plain, tokens[:, :8])
    assert state.held().min() > 4
    a, b = plain(tokens[:, 8:], state), short(tokens[:, 8:], state)
    assert a.state.equal(b.state)
    assert rel_rms(b.logits, a.logits) > 1e-3
    # in eval, or with probability 0, nothing is hidden
    assert torch.equal(short.eval()(tokens[:, 8:], state).logits, plain.eval()(tokens[:, 8:], state).logits)
    assert torch.allclose(plain.train()(tokens[:, 8:], state).logits, a.logits)


# -- variable per-row memories through select, reset, checkpoints ------------------------------
@pytest.fixture
def ragged():
    """A model and a state whose rows and layers hold different numbers of entries."""
    model = _vary_spans(_build(seq_len=4, mem_len=12, max_span=10, ramp_len=2)).eval()
    tokens = torch.randint(0, 64, (3, 16))
    _, state = _run(model, tokens[:, :12])
    held = state.held()
    assert len(set(held[0].tolist())) > 1 and not torch.equal(held[0], held[1])
    return model, tokens, state


def test_select_moves_each_rows_memory_with_it(ragged):
    model, tokens, state = ragged
    straight = model(tokens[:, 12:], state).logits
    swapped = model(tokens[[2, 0], 12:], state.select([2, 0])).logits
    assert rel_rms(swapped, straight[[2, 0]]) < 1e-6
    alone = model(tokens[1:2, 12:], state.select([1])).logits
    assert rel_rms(alone, straight[1:2]) < 1e-6


def test_reset_rows_behave_like_a_fresh_stream(ragged):
    model, tokens, state = ragged
    out = model(tokens[:, 12:], state.reset([1]))
    assert rel_rms(out.logits[1:2], model(tokens[1:2, 12:]).logits) < 1e-5
    assert rel_rms(out.logits[[0, 2]], model(tokens[:, 12:], state).logits[[0, 2]]) < 1e-6
    fresh = model(tokens[1:2, :4], model(tokens[1:2, 12:]).state).logits
    assert rel_rms(model(tokens[:, :4], out.state).logits[1:2], fresh) < 1e-5


def test_state_survives_a_checkpoint_round_trip(ragged):
    model, tokens, state = ragged
    buffer = io.BytesIO()
    torch.save(state.to_tensors("memory."), buffer)
    buffer.seek(0)
    loaded = ExpireSpanMemory.from_tensors(torch.load(buffer, weights_only=True), "memory.")
    assert loaded.equal(state)
    assert torch.equal(model(tokens[:, 12:], loaded).logits, model(tokens[:, 12:], state).logits)


def test_save_pretrained_and_load(tmp_path, ragged):
    model, tokens, state = ragged
    model.save_pretrained(tmp_path)
    loaded = memtx.load(tmp_path).eval()
    assert torch.equal(loaded(tokens[:, 12:], state).logits, model(tokens[:, 12:], state).logits)


# -- streaming generation ----------------------------------------------------------------------
def _prefix_logits(model, tokens, prefix_len):
    seq_len = model.config.seq_len
    state, start = None, 0
    while prefix_len - start > seq_len:
        state = model(tokens[:, start : start + seq_len], state).state
        start += seq_len
    return model(tokens[:, start:prefix_len], state).logits[:, -1]


@pytest.mark.parametrize(
    "seq_len,mem_len,max_span,ramp_len",
    [pytest.param(6, 6, 8, 2, id="T6-M6"), pytest.param(5, 13, 12, 4, id="T5-M13"),
     pytest.param(4, 3, 16, 4, id="T4-M3-cap")],
)
def test_streaming_equals_full_recompute(seq_len, mem_len, max_span, ramp_len):
    model = _vary_spans(_build(seq_len=seq_len, mem_len=mem_len, max_span=max_span,
                               ramp_len=ramp_len)).eval()
    tokens = torch.randint(0, 64, (3, 4 * seq_len + 3))
    stream = model.stream(batch_size=3)
    prompt = 7
    streamed = [stream.feed(tokens[:, :prompt])[:, -1]]
    for t in range(prompt, tokens.shape[1]):
        streamed.append(stream.feed(tokens[:, t : t + 1])[:, -1])
    for i, logits in enumerate(streamed):
        assert rel_rms(logits, _prefix_logits(model, tokens, prompt + i)) < 1e-5, f"prefix {prompt + i}"
    # the committed memory is the one training computes
    _, state = _run(model, tokens[:, : 4 * seq_len])
    assert torch.equal(stream.state.valid, state.valid) and torch.equal(stream.state.age, state.age)
    assert torch.allclose(stream.state.mem, state.mem, atol=1e-6)


def test_streaming_in_chunks_of_any_size_equals_training_forward():
    """Chunks of several tokens mid-segment take the streaming path's multi-query branch
    (causal mask, per-query distances) on top of the keys cached so far."""
    model = _vary_spans(_build(seq_len=6, mem_len=9, max_span=10, ramp_len=3)).eval()
    tokens = torch.randint(0, 64, (3, 30))
    expected, state = _run(model, tokens)
    stream = model.stream(batch_size=3)
    chunks, pos = [], 0
    for size in [1, 3, 2, 4, 1, 1, 5, 6, 2, 5]:  # offsets 0..5 with 1..6 tokens, across segments
        chunks.append(stream.feed(tokens[:, pos : pos + size]))
        pos += size
    assert pos == tokens.shape[1]
    assert rel_rms(torch.cat(chunks, dim=1), expected) < 1e-5
    stream.feed(tokens[:, :1])  # commits the last segment
    assert torch.equal(stream.state.age, state.age) and torch.equal(stream.state.valid, state.valid)


def test_stream_from_a_ragged_state(ragged):
    model, tokens, state = ragged
    stream = model.stream(state, batch_size=3)
    logits = torch.cat([stream.feed(tokens[:, t : t + 1]) for t in range(12, 16)], 1)
    assert rel_rms(logits, model(tokens[:, 12:], state).logits) < 1e-5


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,message",
    [
        pytest.param({"ramp_len": 0}, r"ramp_len=0 must be in \[1, max_span=16\]", id="ramp-0"),
        pytest.param({"ramp_len": -3}, r"ramp_len=-3 must be in \[1, max_span=16\]", id="ramp-negative"),
        pytest.param({"ramp_len": 17}, r"ramp_len=17 must be in \[1, max_span=16\]", id="ramp>max_span"),
        pytest.param({"shorten_prob": 1.5}, r"shorten_prob=1.5 must be in \[0, 1\]", id="shorten_prob"),
        pytest.param({"span_loss_coef": -1.0}, r"span_loss_coef=-1.0 must be >= 0", id="negative-coef"),
        pytest.param({"mem_len": 0}, r"mem_len=0 must be at least 1", id="mem_len-0"),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(memtx.ConfigError, match=message):
        _build(**{"max_span": 16, "ramp_len": 4, **overrides})


@pytest.mark.parametrize(
    "field,shape,message",
    [
        pytest.param("valid", (2, 2, 3), "'mem' dimension is 4 in mem but 3 in valid", id="valid"),
        pytest.param("age", (2, 2, 5), "'mem' dimension is 4 in mem but 5 in age", id="age"),
        pytest.param("age", (2, 3, 4), "'batch' dimension is 2 in mem but 3 in age", id="age-batch"),
        pytest.param("valid", (2, 4), r"valid must have 3 dimensions", id="valid-2d"),
    ],
)
def test_state_whose_fields_disagree(field, shape, message):
    model = _build(seq_len=4, mem_len=8, max_span=8, ramp_len=2)
    good = {"mem": torch.zeros(2, 2, 4, 32), "valid": torch.ones(2, 2, 4, dtype=torch.bool),
            "age": torch.ones(2, 2, 4, dtype=torch.long)}
    bad = {**good, field: torch.zeros(shape, dtype=good[field].dtype)}
    with pytest.raises(memtx.StateError, match=message):
        ExpireSpanMemory.from_tensors(bad)
    with pytest.raises(memtx.StateError, match=message):
        model(torch.zeros(2, 4, dtype=torch.long), ExpireSpanMemory(**bad))


def test_state_with_wrong_dtypes():
    model = _build(seq_len=4, mem_len=8, max_span=8, ramp_len=2)
    state = model(torch.zeros(1, 4, dtype=torch.long)).state
    with pytest.raises(memtx.StateError, match="state.age must hold integer elapsed times"):
        model(torch.zeros(1, 4, dtype=torch.long), ExpireSpanMemory(state.mem, state.valid, state.age.float()))
    with pytest.raises(memtx.StateError, match="state.valid must be a bool mask"):
        model(torch.zeros(1, 4, dtype=torch.long), ExpireSpanMemory(state.mem, state.valid.long(), state.age))
    with pytest.raises(memtx.StateError, match="'mem' dimension is 12, more than this model's limit 8"):
        model(torch.zeros(1, 4, dtype=torch.long), ExpireSpanMemory(
            torch.zeros(2, 1, 12, 32), torch.ones(2, 1, 12, dtype=torch.bool), torch.ones(2, 1, 12, dtype=torch.long)))
