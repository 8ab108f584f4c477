"""segments_to_fill: after that many segments a state stops growing, and not one segment earlier
(benchmarks time and measure only steady-state steps because of it)."""

from __future__ import annotations

import pytest
import torch

import memtx

SMALL = dict(dim=16, depth=2, heads=2, vocab_size=32, seq_len=4)
CASES = [
    pytest.param("transformer_xl", dict(mem_len=10), 3, id="transformer_xl"),
    pytest.param("compressive", dict(mem_len=8, cmem_len=4, compress_ratio=2), 4, id="compressive"),
    # lengths that are not multiples of the segment or of the ratio
    pytest.param("compressive", dict(mem_len=6, cmem_len=3, compress_ratio=2), 3,
                 id="compressive-mem-not-a-multiple"),
    pytest.param("compressive", dict(mem_len=4, cmem_len=4, compress_ratio=3), 3,
                 id="compressive-ratio-not-dividing-the-segment"),
    pytest.param("memory_xl", dict(mem_len=6, lmem_len=3), 2, id="memory_xl"),
    # spans pushed to the maximum below, so the mem_len cap is what binds
    pytest.param("expire_span", dict(mem_len=9, max_span=16, ramp_len=2), 3, id="expire_span-cap"),
    # a cap that never binds: the longest span does (at most max_span + ramp_len - 1 entries)
    pytest.param("expire_span", dict(mem_len=100, max_span=6, ramp_len=3), 2, id="expire_span-span"),
    pytest.param("gateloop", dict(), 0, id="gateloop"),
    pytest.param("memformer", dict(num_memory_slots=3), 0, id="memformer"),
]


def _sizes(state):
    return {name: tuple(t.shape) for name, t, _ in state.items()}


@pytest.mark.parametrize("arch,overrides,expected", CASES)
def test_state_stops_growing_exactly_after_segments_to_fill(arch, overrides, expected):
    torch.manual_seed(0)
    model = memtx.build(arch, **SMALL, **overrides).eval()
    if arch == "expire_span":
        with torch.no_grad():
            for predictor in model.span_predictors:
                predictor.bias.fill_(20.0)
    assert model.segments_to_fill() == expected
    tokens = torch.randint(0, 32, (2, 4 * (expected + 3)))
    state, sizes = None, []
    for start in range(0, tokens.shape[1], 4):
        state = model(tokens[:, start : start + 4], state).state
        sizes.append(_sizes(state))
    steady = sizes[expected - 1] if expected else _sizes(model.init_state(2))
    assert all(s == steady for s in sizes[expected:]), sizes
    if expected:
        before = sizes[expected - 2] if expected >= 2 else _sizes(model.init_state(2))
        assert before != steady  # still growing one segment earlier
