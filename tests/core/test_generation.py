"""Streaming generation equals recomputation; sampling options."""

from __future__ import annotations

import pytest
import torch

import memtx
from memtx.generation import RecomputeStream, sample_next
from memtx.testing import rel_rms

SMALL = dict(dim=32, depth=2, heads=4, vocab_size=48)


def _prefix_logits(model, tokens, prefix_len):
    """Logits of the last token of tokens[:, :prefix_len], recomputed from scratch with the
    training segmentation (full segments with the state carried, then the partial one)."""
    seq_len = model.config.seq_len
    state = None
    start = 0
    while prefix_len - start > seq_len:
        state = model(tokens[:, start : start + seq_len], state).state
        start += seq_len
    return model(tokens[:, start:prefix_len], state).logits[:, -1]


@pytest.mark.parametrize(
    "seq_len,mem_len",
    [pytest.param(6, 6, id="T6-M6"), pytest.param(6, 4, id="T6-M4"), pytest.param(5, 13, id="T5-M13")],
)
@pytest.mark.parametrize("stream_kind", ["model", "recompute"])
def test_streaming_logits_equal_recomputing_each_prefix(seq_len, mem_len, stream_kind):
    model = memtx.build("transformer_xl", seq_len=seq_len, mem_len=mem_len, **SMALL).eval()
    tokens = torch.randint(0, 48, (2, 4 * seq_len + 3))
    stream = model.stream(batch_size=2) if stream_kind == "model" else RecomputeStream(model, None, 2)
    prompt = 7  # the prompt goes in as one call, then tokens one by one
    streamed = [stream.feed(tokens[:, :prompt])[:, -1]]
    for t in range(prompt, tokens.shape[1]):
        streamed.append(stream.feed(tokens[:, t : t + 1])[:, -1])
    for i, logits in enumerate(streamed):
        expected = _prefix_logits(model, tokens, prompt + i)
        assert rel_rms(logits, expected) < 1e-5, f"prefix {prompt + i}"


def test_stream_commits_the_same_memory_as_training():
    model = memtx.build("transformer_xl", seq_len=6, mem_len=9, **SMALL).eval()
    tokens = torch.randint(0, 48, (2, 13))
    stream = model.stream(batch_size=2)
    for t in range(tokens.shape[1]):
        stream.feed(tokens[:, t : t + 1])
    state = model(tokens[:, 6:12], model(tokens[:, :6]).state).state
    assert torch.allclose(stream.state.mem, state.mem, atol=1e-6)
    assert torch.equal(stream.state.valid, state.valid)


def test_greedy_generate_equals_a_naive_loop():
    model = memtx.build("transformer_xl", seq_len=8, mem_len=8, **SMALL).eval()
    prompt = torch.randint(0, 48, (2, 11))
    seen = []
    new = memtx.generate(model, prompt, 20, temperature=0, callback=seen.append)
    tokens = prompt
    for _ in range(20):
        logits = _prefix_logits(model, tokens, tokens.shape[1])
        tokens = torch.cat((tokens, logits.argmax(-1, keepdim=True)), 1)
    assert torch.equal(new, tokens[:, 11:])
    assert torch.equal(torch.stack(seen, 1), new)


def test_sampling_is_reproducible_with_a_generator_and_top_k_1_is_greedy():
    model = memtx.build("transformer_xl", seq_len=8, mem_len=8, **SMALL).eval()
    prompt = torch.randint(0, 48, (1, 5))
    a = memtx.generate(model, prompt, 12, generator=torch.Generator().manual_seed(3))
    b = memtx.generate(model, prompt, 12, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(
        memtx.generate(model, prompt, 12, top_k=1), memtx.generate(model, prompt, 12, temperature=0)
    )


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    draws = torch.stack([
        sample_next(logits, top_p=0.8, generator=torch.Generator().manual_seed(s)) for s in range(300)
    ])
    # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are never drawn, both 0 and 1 are
    assert set(draws.flatten().tolist()) == {0, 1}
    draws = torch.stack([
        sample_next(logits, top_p=0.81, generator=torch.Generator().manual_seed(s)) for s in range(300)
    ])
    assert set(draws.flatten().tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        pytest.param({"top_p": 0.0}, "top_p must be in \\(0, 1\\]", id="top_p-0"),
        pytest.param({"top_p": 1.5}, "top_p must be in \\(0, 1\\]", id="top_p-1.5"),
        pytest.param({"top_k": 0}, "top_k must be >= 1", id="top_k-0"),
        pytest.param({"temperature": -1.0}, "temperature must be >= 0", id="temperature"),
    ],
)
def test_bad_sampling_arguments(kwargs, message):
    model = memtx.build("transformer_xl", **SMALL)
    with pytest.raises(memtx.InputError, match=message):
        memtx.generate(model, torch.zeros(1, 3, dtype=torch.long), 4, **kwargs)


def test_generation_restores_training_mode():
    model = memtx.build("transformer_xl", **SMALL).train()
    memtx.generate(model, torch.zeros(1, 3, dtype=torch.long), 2)
    assert model.training
