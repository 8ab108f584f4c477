"""The attention ops (memory attention, Transformer-XL relative attention, relative attention at
per-pair distances) against their explicit-softmax references."""

from __future__ import annotations

import pytest
import torch

from memtx.ops.attention import (
    causal_mask,
    memory_attention,
    memory_attention_ref,
    pairwise_relative_attention,
    pairwise_relative_attention_ref,
    relative_memory_attention,
    relative_memory_attention_ref,
)
from memtx.ops import attention as attention_ops
from memtx.testing import grads, rel_rms

CASES = [
    pytest.param(2, 4, 8, 0, 16, id="B2-H4-T8-M0"),
    pytest.param(2, 4, 8, 8, 16, id="B2-H4-T8-M8"),
    pytest.param(1, 2, 5, 23, 8, id="B1-H2-T5-M23-memory-longer-than-segment"),
    pytest.param(3, 2, 1, 7, 8, id="B3-H2-T1-M7-single-query"),
]


def _inputs(batch, heads, length, mem, dim, kv_heads=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    q = torch.randn(batch, heads, length, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, mem + length, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, mem + length, dim, generator=g, dtype=torch.float64)
    bias = torch.randn(batch, heads, length, mem + length, generator=g, dtype=torch.float64)
    valid = torch.rand(batch, mem + length, generator=g) > 0.4
    valid[:, mem:] = True  # segment keys always exist
    return [t.requires_grad_() for t in (q, k, v, bias)] + [valid]


def test_causal_mask_is_lower_right_aligned():
    expected = torch.tensor(
        [[1, 1, 1, 0, 0],
         [1, 1, 1, 1, 0],
         [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(3, 5), expected)


@pytest.mark.parametrize("batch,heads,length,mem,dim", CASES)
@pytest.mark.parametrize("use_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("use_valid", [False, True], ids=["all-valid", "padded-memory"])
def test_matches_reference_outputs_and_grads(batch, heads, length, mem, dim, use_bias, use_valid):
    q, k, v, bias, valid = _inputs(batch, heads, length, mem, dim)
    kwargs = dict(bias=bias if use_bias else None, key_valid=valid if use_valid else None)
    fast = memory_attention(q, k, v, **kwargs)
    ref = memory_attention_ref(q, k, v, **kwargs)
    assert rel_rms(fast, ref) < 1e-10
    inputs = [q, k, v] + ([bias] if use_bias else [])
    for g_fast, g_ref in zip(grads(fast, inputs), grads(ref, inputs)):
        assert rel_rms(g_fast, g_ref) < 1e-10


def test_shared_key_value_head_broadcasts():
    q, k, v, _, _ = _inputs(2, 4, 6, 5, 8, kv_heads=1)
    fast = memory_attention(q, k, v)
    ref = memory_attention_ref(q, k, v)
    assert rel_rms(fast, ref) < 1e-10
    for g_fast, g_ref in zip(grads(fast, [q, k, v]), grads(ref, [q, k, v])):
        assert rel_rms(g_fast, g_ref) < 1e-10


def test_reference_ignores_future_and_invalid_keys():
    q, k, v, _, valid = _inputs(2, 2, 4, 6, 8)
    base = memory_attention_ref(q, k, v, key_valid=valid)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[..., -1, :] += 5.0  # the last key is in the future of every query but the last
    v2[..., -1, :] += 5.0
    k2[~valid[:, None, :, None].expand_as(k2)] = 100.0  # invalid memory entries
    moved = memory_attention_ref(q, k2, v2, key_valid=valid)
    assert torch.allclose(base[..., :-1, :], moved[..., :-1, :])
    assert not torch.allclose(base[..., -1, :], moved[..., -1, :])


def test_rejects_bad_shapes():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="K >= T"):
        memory_attention(q, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))


# -- Transformer-XL attention with the hand-written backward ------------------------------------
REL_CASES = [
    pytest.param(2, 4, 8, 0, 0, id="T8-M0"),
    pytest.param(2, 3, 8, 8, 0, id="T8-M8"),
    pytest.param(1, 2, 5, 23, 0, id="T5-M23-memory-longer-than-segment"),
    pytest.param(3, 2, 1, 7, 0, id="T1-M7-single-query"),
    pytest.param(2, 2, 6, 4, 5, id="T6-M4-plus-5-keys-without-positions"),
    pytest.param(2, 2, 1, 4, 3, id="T1-M4-plus-3-keys-without-positions"),
]


def _assert_same_outputs_and_grads(fast, ref, inputs, tol=1e-10):
    """``fast`` equals ``ref`` in value and in its gradient for every named input."""
    assert rel_rms(fast, ref) < tol
    names, tensors = list(inputs), list(inputs.values())
    for name, g_fast, g_ref in zip(names, grads(fast, tensors), grads(ref, tensors)):
        assert torch.isfinite(g_fast).all(), name
        assert rel_rms(g_fast, g_ref) < tol, name


def _rel_inputs(batch, heads, length, mem, extra, dim=8, kv_heads=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or heads
    keys = extra + mem + length

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    qc, qp = randn(batch, heads, length, dim), randn(batch, heads, length, dim)
    k, v = randn(batch, kv_heads, keys, dim), randn(batch, kv_heads, keys, dim)
    r = randn(heads, mem + length, dim)
    valid = torch.rand(batch, keys, generator=g) > 0.4
    valid[:, keys - length:] = True
    return qc, qp, k, v, r, valid


@pytest.mark.parametrize("batch,heads,length,mem,extra", REL_CASES)
@pytest.mark.parametrize("use_valid", [False, True], ids=["all-valid", "padded-memory"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-weights", "recompute"])
def test_relative_attention_matches_reference_outputs_and_grads(batch, heads, length, mem, extra,
                                                                use_valid, recompute):
    qc, qp, k, v, r, valid = _rel_inputs(batch, heads, length, mem, extra)
    kwargs = dict(key_valid=valid if use_valid else None, scale=0.37)
    fast = relative_memory_attention(qc, qp, k, v, r, recompute=recompute, **kwargs)
    ref = relative_memory_attention_ref(qc, qp, k, v, r, **kwargs)
    _assert_same_outputs_and_grads(fast, ref, dict(qc=qc, qp=qp, k=k, v=v, r=r))


def test_relative_attention_shared_kv_head_and_general_path():
    qc, qp, k, v, r, valid = _rel_inputs(2, 4, 6, 5, 0, kv_heads=1)
    bias = torch.randn(2, 4, 6, 11, dtype=torch.float64, requires_grad=True)
    for kwargs, inputs in (({}, [qc, qp, k, v, r]),
                           ({"score_bias": bias}, [qc, qp, k, v, r, bias])):
        fast = relative_memory_attention(qc, qp, k, v, r, key_valid=valid, **kwargs)
        ref = relative_memory_attention_ref(qc, qp, k, v, r, key_valid=valid, **kwargs)
        assert rel_rms(fast, ref) < 1e-10
        for g_fast, g_ref in zip(grads(fast, inputs), grads(ref, inputs)):
            assert rel_rms(g_fast, g_ref) < 1e-10


@pytest.mark.parametrize("recompute", [False, True], ids=["keep-weights", "recompute"])
def test_relative_attention_float32_and_bfloat16_autocast(recompute):
    qc, qp, k, v, r, _ = _rel_inputs(2, 2, 16, 16, 0, dim=16)
    ref = relative_memory_attention_ref(qc, qp, k, v, r)
    as32 = [t.detach().float().requires_grad_() for t in (qc, qp, k, v, r)]
    fast = relative_memory_attention(*as32, recompute=recompute)
    assert fast.dtype == torch.float32 and rel_rms(fast, ref) < 1e-5
    for g_fast, g_ref in zip(grads(fast.double(), as32), grads(ref, [qc, qp, k, v, r])):
        assert rel_rms(g_fast, g_ref) < 1e-5
    low = relative_memory_attention(*(t.detach().bfloat16() for t in (qc, qp, k, v, r)))
    assert low.dtype == torch.bfloat16 and rel_rms(low, ref) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_valid", [False, True], ids=["causal", "invalid-memory"])
def test_relative_attention_masks_keys_whose_scores_overflow(dtype, with_valid):
    # the masks are added to the scores as 0 / -inf (faster than masked_fill on the CPU), except
    # in float16, whose scores can overflow to +inf, where inf - inf would be NaN: a key after
    # every query but the last, or an invalid memory key, scores +inf for every query in float16
    qc, qp, k, v, r, valid = _rel_inputs(1, 2, 6, 4, 0, dim=8)
    valid = valid if with_valid else None
    with torch.no_grad():
        qc.fill_(1.0)
        k[:, :, -1] = 6e4  # the last key: seen only by the last query
        if with_valid:
            k[:, :, ~valid[0]] = 6e4
    kept = k.clone()
    kept[:, :, -1] = 0  # what the first T - 1 queries may see
    inputs = [t.detach().to(dtype).requires_grad_() for t in (qc, qp, k, v, r)]
    fast = relative_memory_attention(*inputs, key_valid=valid)
    loss_rows = fast[:, :, :-1]  # the last query sees the overflowing key itself
    ref = relative_memory_attention_ref(qc, qp, kept, v, r, key_valid=valid)[:, :, :-1]
    assert torch.isfinite(loss_rows).all()
    assert rel_rms(loss_rows.double(), ref) < (5e-3 if dtype == torch.float16 else 1e-5)
    for g in grads(loss_rows.float(), inputs[:2]):  # the last query's own output is not finite
        assert torch.isfinite(g[:, :, :-1]).all()


def test_relative_attention_recompute_keeps_no_attention_weights_for_backward():
    batch, heads, length, mem = 2, 4, 128, 128
    qc, qp, k, v, r, _ = _rel_inputs(batch, heads, length, mem, 0)
    # the kept weights: every chunk of queries against the keys up to its last query
    chunks = attention_ops._query_chunks(length, mem + length, mem + length, causal=True)
    assert len(chunks) == 2 and chunks[0][2] < mem + length  # the test covers skipped keys
    weight_bytes = sum(batch * heads * (q1 - q0) * keys * qc.element_size()
                       for q0, q1, keys, _ in chunks)

    def saved_bytes(recompute):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            relative_memory_attention(qc, qp, k, v, r, recompute=recompute)
        return sum(saved)

    kept, recomputed = saved_bytes(False), saved_bytes(True)
    # the weights go; the (T, K) bool mask comes in
    assert kept - recomputed >= 0.9 * weight_bytes
    assert recomputed < weight_bytes / 2  # what is left is the inputs, far smaller


def test_relative_attention_recompute_with_dropout_and_bias_replays_the_same_masks():
    qc, qp, k, v, r, valid = _rel_inputs(2, 2, 6, 5, 0)
    bias = torch.randn(2, 2, 6, 11, dtype=torch.float64, requires_grad=True)
    inputs = [qc, qp, k, v, r, bias]
    results = []
    for recompute in (False, True):
        torch.manual_seed(3)
        out = relative_memory_attention(qc, qp, k, v, r, key_valid=valid, score_bias=bias,
                                        dropout_p=0.5, recompute=recompute)
        results.append((out, grads(out, inputs)))
    (out, g), (out_rc, g_rc) = results
    assert torch.equal(out, out_rc)
    for a, b in zip(g, g_rc):
        assert rel_rms(b, a) < 1e-12


# -- relative attention at per-pair distances ----------------------------------------------------
PAIRWISE_CASES = [
    pytest.param(2, 4, 6, 9, 13, 4, id="B2-H4-T6-K9-N13"),
    pytest.param(1, 2, 5, 5, 5, 2, id="no-memory"),
    pytest.param(3, 2, 1, 7, 10, 2, id="single-query"),
    pytest.param(2, 4, 6, 9, 13, 1, id="shared-kv-head"),
]


def _pairwise_inputs(batch, heads, length, keys, table, kv_heads, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    qc, qp = randn(batch, heads, length, 8), randn(batch, heads, length, 8)
    k, v = randn(batch, kv_heads, keys, 8), randn(batch, kv_heads, keys, 8)
    r = randn(heads, table, 8)
    # random distances repeat within a row, which the scatter in backward must add up
    distances = torch.randint(0, table, (batch, length, keys), generator=g)
    bias = torch.randn(batch, length, keys, generator=g, dtype=dtype)
    blocked = causal_mask(length, keys).logical_not() | (torch.rand(batch, length, keys, generator=g) < 0.3)
    blocked[:, torch.arange(length), torch.arange(keys - length, keys)] = False  # own key stays
    bias = bias.masked_fill(blocked, float("-inf")).requires_grad_()
    return qc, qp, k, v, r, distances, bias


@pytest.mark.parametrize("batch,heads,length,keys,table,kv_heads", PAIRWISE_CASES)
def test_pairwise_relative_attention_matches_reference_outputs_and_grads(
    batch, heads, length, keys, table, kv_heads
):
    qc, qp, k, v, r, distances, bias = _pairwise_inputs(batch, heads, length, keys, table, kv_heads)
    fast = pairwise_relative_attention(qc, qp, k, v, r, distances, bias, scale=0.41)
    ref = pairwise_relative_attention_ref(qc, qp, k, v, r, distances, bias, scale=0.41)
    assert rel_rms(fast, ref) < 1e-10
    inputs = [qc, qp, k, v, r, bias]
    for name, g_fast, g_ref in zip("qc qp k v r bias".split(), grads(fast, inputs), grads(ref, inputs)):
        assert torch.isfinite(g_fast).all(), name  # no NaN from the -inf entries
        assert rel_rms(g_fast, g_ref) < 1e-10, name


def test_pairwise_relative_attention_float32_matches_float64():
    args64 = _pairwise_inputs(2, 4, 6, 9, 13, 4)
    args32 = [a.detach().float().requires_grad_() if a.is_floating_point() else a for a in args64]
    out64 = pairwise_relative_attention(*args64)
    out32 = pairwise_relative_attention(*args32)
    assert out32.dtype == torch.float32
    assert rel_rms(out32.double(), out64) < 1e-5
    weight = torch.randn(out64.shape, dtype=torch.float64)  # one cotangent for both
    picked = [0, 4, 6]  # q_content, r, bias
    g32 = torch.autograd.grad((out32 * weight.float()).sum(), [args32[i] for i in picked])
    g64 = torch.autograd.grad((out64 * weight).sum(), [args64[i] for i in picked])
    for got, want in zip(g32, g64):
        assert rel_rms(got.double(), want) < 1e-5


def test_pairwise_relative_attention_with_dropout_drops_the_renormalised_weights():
    qc, qp, k, v, r, distances, bias = _pairwise_inputs(2, 4, 6, 9, 13, 4)
    torch.manual_seed(3)
    fast = pairwise_relative_attention(qc, qp, k, v, r, distances, bias, dropout_p=0.3)
    # the same computation written out, drawing the same dropout mask
    from memtx.ops.position import gather_position_scores_ref
    scale = 8 ** -0.5
    scores = (torch.einsum("bhid,bhjd->bhij", qc, k) * scale
              + gather_position_scores_ref(qp * scale, r, distances) + bias[:, None])
    torch.manual_seed(3)
    weights = torch.nn.functional.dropout(scores.softmax(-1), p=0.3)
    expected = torch.einsum("bhij,bhjd->bhid", weights, v)
    assert rel_rms(fast, expected) < 1e-10
    without = pairwise_relative_attention(qc, qp, k, v, r, distances, bias)
    assert rel_rms(fast, without) > 0.05  # dropout did act
    inputs = [qc, qp, k, v, r, bias]
    for name, got, want in zip("qc qp k v r bias".split(), grads(fast, inputs), grads(expected, inputs)):
        assert rel_rms(got, want) < 1e-10, name


def test_pairwise_relative_attention_rejects_mismatched_pairs():
    qc, qp, k, v, r, distances, bias = _pairwise_inputs(1, 2, 4, 6, 8, 2)
    with pytest.raises(ValueError, match=r"distances .* and bias .* must both be \(B, T, K\)"):
        pairwise_relative_attention(qc, qp, k, v, r, distances[:, :, :-1], bias)
    with pytest.raises(ValueError, match=r"must both be \(B, T, K\) = \(1, 4, 6\)"):
        pairwise_relative_attention(qc, qp, k, v, r, distances, bias[:, :-1])



def test_pairwise_relative_attention_in_bfloat16_and_under_autocast():
    qc, qp, k, v, r, distances, bias = _pairwise_inputs(2, 4, 6, 9, 13, 4)
    ref = pairwise_relative_attention_ref(qc, qp, k, v, r, distances, bias)
    low = pairwise_relative_attention(
        *(t.detach().bfloat16() for t in (qc, qp, k, v, r)), distances, bias.detach().bfloat16()
    )
    assert low.dtype == torch.bfloat16 and rel_rms(low.double(), ref) < 2e-2
    # autocast hands the op a float32 bias and bfloat16 projections, as a model under autocast does
    leaves = [t.detach().float().requires_grad_() for t in (qc, qp, k, v, r)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projected = [t @ torch.eye(t.shape[-1]) for t in leaves]  # bfloat16 under autocast
        out = pairwise_relative_attention(*projected, distances, bias.detach().float())
    assert out.dtype == torch.bfloat16 and rel_rms(out.double(), ref) < 2e-2
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_in_place_softmax_equals_softmax():
    from memtx.ops.attention import softmax_in_place

    g = torch.Generator().manual_seed(0)
    for shape in [(6, 5, 37), (3, 1, 1200), (2, 300, 9)]:
        scores = torch.randn(shape, generator=g) * 30
        scores[..., 1::3] = float("-inf")  # masked keys, as the attention ops leave them
        scores[..., 0] = 1e4  # a dominant key
        want = torch.softmax(scores, dim=-1)
        got = softmax_in_place(scores.clone())
        assert torch.equal(got, want)
        same_storage = scores.clone()
        assert softmax_in_place(same_storage).data_ptr() == same_storage.data_ptr()


@pytest.mark.parametrize("recompute", [False, True])
def test_relative_attention_backward_twice_gives_the_same_gradients(recompute):
    # backward reuses storage it owns (rebuilt weights); saved tensors must survive a first pass
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    qc, qp, k, v, r = leaf(2, 2, 6, 8), leaf(2, 2, 6, 8), leaf(2, 2, 10, 8), leaf(2, 2, 10, 8), leaf(2, 10, 8)
    out = relative_memory_attention(qc, qp, k, v, r, recompute=recompute)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
    first = torch.autograd.grad(loss, [qc, qp, k, v, r], retain_graph=True)
    second = torch.autograd.grad(loss, [qc, qp, k, v, r])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("query_chunk", [64, 2], ids=["one-query-chunk", "query-chunks-of-2"])
@pytest.mark.parametrize("matrices", [1, 2, 8], ids=["single-heads", "head-pairs", "two-rows"])
@pytest.mark.parametrize("length,mem,extra", [(6, 5, 0), (7, 4, 0), (7, 4, 3), (1, 6, 0), (1, 4, 3)],
                         ids=["T6", "T7", "T7-keys-without-positions", "T1",
                              "T1-keys-without-positions"])
@pytest.mark.parametrize("use_valid", [False, True], ids=["all-valid", "padded-memory"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep-weights", "recompute"])
def test_relative_attention_in_blocks_of_heads_matches_reference(monkeypatch, query_chunk, matrices,
                                                                  length, mem, extra, use_valid,
                                                                  recompute):
    # blocks of `matrices` (T, K) score matrices: a few heads of one row, or whole rows (4 heads
    # per row, 3 rows: the last block of two rows is one row); with chunks of 2 queries a
    # segment of 6 or 7 is cut in 3 chunks (7: 2, 3, 2), each seeing only the keys up to its
    # last query
    batch, heads = 3, 4
    monkeypatch.setattr(attention_ops, "_QUERY_CHUNK", query_chunk)
    qc, qp, k, v, r, valid = _rel_inputs(batch, heads, length, mem, extra, seed=3)
    keys = k.shape[-2]
    chunks = attention_ops._query_chunks(length, keys, r.shape[-2], causal=length > 1)
    assert len(chunks) == (3 if query_chunk == 2 and length > 1 else 1)
    rows = max(q1 - q0 for q0, q1, *_ in chunks)  # the op sizes its blocks by the largest chunk
    monkeypatch.setattr(attention_ops, "_BLOCK_BYTES", matrices * rows * keys * 8)
    blocks = attention_ops._head_blocks(batch, heads, rows * keys * 8, torch.device("cpu"))
    assert blocks[0][1] - blocks[0][0] == matrices and len(blocks) == -(-batch * heads // matrices)
    kwargs = dict(key_valid=valid if use_valid else None, scale=0.41)
    fast = relative_memory_attention(qc, qp, k, v, r, recompute=recompute, **kwargs)
    ref = relative_memory_attention_ref(qc, qp, k, v, r, **kwargs)
    _assert_same_outputs_and_grads(fast, ref, dict(qc=qc, qp=qp, k=k, v=v, r=r))
    with torch.no_grad():  # one block of weights at a time; one query: the fused kernel
        assert rel_rms(relative_memory_attention(qc, qp, k, v, r, **kwargs), ref) < 1e-10


@pytest.mark.parametrize("causal", [False, True], ids=["all-queries", "query-chunks-of-2"])
@pytest.mark.parametrize("matrices", [1, 2, 8], ids=["single-heads", "head-pairs", "two-rows"])
@pytest.mark.parametrize("length,keys,table", [(6, 9, 13), (7, 12, 15), (1, 7, 10)],
                         ids=["T6", "T7", "T1"])
def test_pairwise_relative_attention_in_blocks_of_heads_matches_reference(monkeypatch, causal,
                                                                          matrices, length, keys,
                                                                          table):
    # 3 rows of 4 heads in blocks of `matrices` (the last block of two rows is one row); with
    # `causal` a segment of 6 or 7 queries runs in 3 chunks (7: 2, 3, 2) that skip later keys
    batch, heads = 3, 4
    qc, qp, k, v, r, distances, bias = _pairwise_inputs(batch, heads, length, keys, table, heads,
                                                         seed=5)
    monkeypatch.setattr(attention_ops, "_QUERY_CHUNK", 2)
    chunks = attention_ops._query_chunks(length, keys, keys, causal and length > 1)
    assert len(chunks) == (3 if causal and length > 1 else 1)
    matrix_bytes = max(q1 - q0 for q0, q1, *_ in chunks) * max(keys, table) * 8
    monkeypatch.setattr(attention_ops, "_BLOCK_BYTES", matrices * matrix_bytes)
    blocks = attention_ops._head_blocks(batch, heads, matrix_bytes, torch.device("cpu"))
    assert blocks[0][1] - blocks[0][0] == matrices and len(blocks) == -(-batch * heads // matrices)
    fast = pairwise_relative_attention(qc, qp, k, v, r, distances, bias, scale=0.37, causal=causal)
    ref = pairwise_relative_attention_ref(qc, qp, k, v, r, distances, bias, scale=0.37)
    _assert_same_outputs_and_grads(fast, ref, dict(qc=qc, qp=qp, k=k, v=v, r=r, bias=bias))
    with torch.no_grad():  # a streamed token takes a path of its own
        assert rel_rms(pairwise_relative_attention(qc, qp, k, v, r, distances, bias, scale=0.37,
                                                   causal=causal), ref) < 1e-10


@pytest.mark.parametrize("matrices", [2, 12], ids=["several-blocks", "one-block"])
def test_attention_ops_with_a_softmax_that_is_not_in_place(monkeypatch, matrices):
    # off the CPU the softmax makes a new tensor: the kept weights must still be the ones used
    monkeypatch.setattr(attention_ops, "softmax_in_place", lambda scores: scores.softmax(-1))
    monkeypatch.setattr(attention_ops, "_QUERY_CHUNK", 2)
    qc, qp, k, v, r, valid = _rel_inputs(3, 4, 6, 5, 0, seed=7)
    monkeypatch.setattr(attention_ops, "_BLOCK_BYTES", matrices * 6 * 11 * 8)
    for recompute in (False, True):
        fast = relative_memory_attention(qc, qp, k, v, r, key_valid=valid, recompute=recompute)
        ref = relative_memory_attention_ref(qc, qp, k, v, r, key_valid=valid)
        _assert_same_outputs_and_grads(fast, ref, dict(qc=qc, qp=qp, k=k, v=v, r=r))
    args = _pairwise_inputs(3, 4, 6, 9, 13, 4, seed=8)
    monkeypatch.setattr(attention_ops, "_BLOCK_BYTES", matrices * 6 * 13 * 8)
    fast = pairwise_relative_attention(*args)
    ref = pairwise_relative_attention_ref(*args)
    _assert_same_outputs_and_grads(fast, ref, dict(zip(("qc", "qp", "k", "v", "r"), args[:5]),
                                                   bias=args[6]))
