"""Relative-position scores via the shift trick against the explicit distance matrix."""

from __future__ import annotations

import math

import pytest
import torch

from memtx.ops.attention import causal_mask
from memtx.ops.position import (
    gather_position_scores,
    gather_position_scores_ref,
    rel_shift,
    relative_distances,
    relative_position_scores,
    relative_position_scores_ref,
    sinusoid,
)
from memtx.testing import grads, rel_rms


def test_sinusoid_values():
    emb = sinusoid(torch.tensor([0.0, 1.0, 3.0]), 4)
    # frequencies 1 and 1/100 for dim 4
    expected = torch.tensor([
        [0.0, 0.0, 1.0, 1.0],
        [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)],
        [math.sin(3), math.sin(0.03), math.cos(3), math.cos(0.03)],
    ])
    assert torch.allclose(emb, expected, atol=1e-6)


def test_rel_shift_on_a_small_example():
    # T=2 queries, K=3 keys (M=1): column c of the input is distance 2-c
    scores = torch.tensor([[10.0, 11.0, 12.0, 0.0], [20.0, 21.0, 22.0, 0.0]])  # + padding
    shifted = rel_shift(scores)
    # query 0 (position 1): keys 0,1 at distances 1,0 -> columns 1,2
    # query 1 (position 2): keys 0,1,2 at distances 2,1,0 -> columns 0,1,2
    assert shifted[0, :2].tolist() == [11.0, 12.0]
    assert shifted[1].tolist() == [20.0, 21.0, 22.0]


@pytest.mark.parametrize(
    "length,mem",
    [pytest.param(6, 0, id="T6-M0"), pytest.param(6, 6, id="T6-M6"),
     pytest.param(3, 17, id="T3-M17"), pytest.param(1, 9, id="T1-M9"),
     pytest.param(7, 2, id="T7-M2")],
)
def test_matches_reference_outputs_and_grads(length, mem):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, length, 5, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, mem + length, 5, generator=g, dtype=torch.float64, requires_grad=True)
    allowed = causal_mask(length, mem + length)
    fast = relative_position_scores(q, r).masked_fill(~allowed, 0.0)
    ref = relative_position_scores_ref(q, r)
    assert rel_rms(fast, ref) < 1e-12
    for g_fast, g_ref in zip(grads(fast, [q, r]), grads(ref, [q, r])):
        assert rel_rms(g_fast, g_ref) < 1e-12


def test_distances_are_descending():
    assert relative_distances(4).tolist() == [3, 2, 1, 0]


# -- position scores at per-pair distances -----------------------------------------------------
@pytest.mark.parametrize(
    "batch,heads,queries,keys,table",
    [pytest.param(2, 3, 4, 7, 11, id="B2-H3-T4-K7-N11"), pytest.param(1, 2, 1, 5, 6, id="one-query")],
)
def test_gather_position_scores_matches_reference(batch, heads, queries, keys, table):
    q = torch.randn(batch, heads, queries, 8, dtype=torch.float64, requires_grad=True)
    r = torch.randn(heads, table, 8, dtype=torch.float64, requires_grad=True)
    distances = torch.randint(0, table, (batch, queries, keys))
    out = gather_position_scores(q, r, distances)
    ref = gather_position_scores_ref(q, r, distances)
    assert rel_rms(out, ref) < 1e-12
    for got, want in zip(grads(out, [q, r]), grads(ref, [q, r])):
        assert rel_rms(got, want) < 1e-12
