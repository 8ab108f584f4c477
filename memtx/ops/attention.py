"""Causal attention of a segment over ``[memory; segment]``.

Layout: ``(B, H, T, D)`` for queries and ``(B, H, K, D)`` for keys and values, where K = M + T
keys are the M memory positions followed by the T segment positions. Query ``i`` sits at key
position ``M + i``, so the causal mask is aligned to the lower right: query ``i`` may see key
``j`` iff ``j <= i + K - T``.

Shape legend: B batch, H heads, T queries (segment), K keys (memory + segment), D head dim.

:func:`memory_attention` runs on :func:`torch.nn.functional.scaled_dot_product_attention` (fused
kernels on CPU and GPU); :func:`memory_attention_ref` is the plain softmax it must equal.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from memtx.ops.autocast import no_autocast


def causal_mask(num_queries: int, num_keys: int, device: torch.device | None = None) -> Tensor:
    """Boolean (T, K) mask, True where query i may attend to key j (lower-right aligned)."""
    if num_keys < num_queries:
        raise ValueError(f"need at least as many keys as queries, got K={num_keys} < T={num_queries}")
    return _causal_mask(num_queries, num_keys, torch.device(device or "cpu"))


# cached: every layer of every step asks for the same few shapes (callers never write to them)
@functools.lru_cache(maxsize=64)
def _causal_mask(num_queries: int, num_keys: int, device: torch.device) -> Tensor:
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(
        num_keys - num_queries
    )


@functools.lru_cache(maxsize=64)
def causal_blocked(num_queries: int, num_keys: int, device: torch.device) -> Tensor:
    """Boolean (T, K), True where query i must not see key j: ``~causal_mask`` (cached; callers
    must not write to it)."""
    return ~_causal_mask(num_queries, num_keys, device)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "memory_attention expects (B, H, T, D) tensors, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or k.shape[-2] < q.shape[-2]:
        raise ValueError(
            f"keys {tuple(k.shape)} and values {tuple(v.shape)} must share (B, H, K) with "
            f"K >= T = {q.shape[-2]}"
        )


def memory_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    key_valid: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    causal: bool = True,
) -> Tensor:
    """Causal attention of T queries over K = M + T keys (fast path).

    Args:
        q: (B, H, T, D) queries.
        k, v: (B, H, K, D) keys and values, memory first. H may be 1 for shared key/value heads.
        bias: optional additive score bias broadcastable to (B, H, T, K), already scaled
            (relative-position terms).
        key_valid: optional (B, K) bool, False for keys that must never be seen (empty memory
            slots). Every query must keep at least its own key, so rows never go empty.
        scale: score scale, default ``1/sqrt(D)``.
        dropout_p: attention dropout probability (pass 0.0 in eval).
        causal: apply the lower-right causal mask; False when ``bias`` already carries every
            mask (``-inf`` entries).

    Returns:
        (B, H, T, D) attention output.
    """
    _check_shapes(q, k, v)
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    if k.shape[1] != q.shape[1]:
        k = k.expand(-1, q.shape[1], -1, -1)
        v = v.expand(-1, q.shape[1], -1, -1)
    if bias is None and key_valid is None:
        if not causal:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        if num_queries == num_keys:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale
            )
        if num_queries == 1:  # one new token sees every key: no mask at all
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(num_queries, num_keys),
            dropout_p=dropout_p, scale=scale,
        )
    # With a score bias (relative positions) the fused kernels would fall back to an unfused
    # path anyway; writing it out lets the bias ride in the score matmul (baddbmm).
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    batch, heads, _, dim = q.shape
    if bias is None:
        bias = torch.zeros((), dtype=q.dtype, device=q.device)
    bias = bias.to(q.dtype).expand(batch, heads, num_queries, num_keys)
    scores = torch.baddbmm(
        bias.reshape(-1, num_queries, num_keys),
        q.reshape(-1, num_queries, dim),
        k.reshape(-1, num_keys, dim).transpose(1, 2),
        alpha=scale,
    ).view(batch, heads, num_queries, num_keys)
    # masking the fresh scores in place saves a masked copy of the bias, forward and backward
    blocked = causal_blocked(num_queries, num_keys, q.device) if causal else None  # (T, K)
    if key_valid is not None:
        invalid = ~key_valid[:, None, None, :]  # (B, 1, T, K)
        blocked = invalid if blocked is None else blocked | invalid
    if blocked is not None:
        scores = scores.masked_fill_(blocked, float("-inf"))
    scores = scores.view(-1, num_queries, num_keys)
    weights = F.dropout(scores.softmax(dim=-1), p=dropout_p) if dropout_p else scores.softmax(dim=-1)
    out = torch.bmm(weights, v.reshape(-1, num_keys, v.shape[-1]))
    return out.view(batch, heads, num_queries, -1)


def memory_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    key_valid: Tensor | None = None,
    scale: float | None = None,
    causal: bool = True,
) -> Tensor:
    """Reference for :func:`memory_attention`: explicit scores, mask and softmax (no dropout)."""
    _check_shapes(q, k, v)
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q, k.expand(-1, q.shape[1], -1, -1)) * scale
    if bias is not None:
        scores = scores + bias
    allowed = torch.zeros(num_queries, num_keys, dtype=torch.bool, device=q.device)
    for i in range(num_queries):
        allowed[i, : i + num_keys - num_queries + 1 if causal else num_keys] = True
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = scores.softmax(dim=-1)
    return torch.einsum("bhij,bhjd->bhid", weights, v.expand(-1, q.shape[1], -1, -1))


# ============================================================================================
# Transformer-XL attention: content and relative-position scores in one autograd node
# ============================================================================================
def _shifted(base: Tensor, num_queries: int, num_pos: int) -> Tensor:
    """(N, T, P) view of (N, T, P) per-distance scores ``base`` (column c = distance P-1-c) in
    which entry (i, j) holds distance ``i + P - T - j``: ``base[n, i, j + T - 1 - i]``.

    Row i starts at flat offset ``T - 1 + i (P - 1)`` of each (T, P) matrix, so consecutive
    rows share one element: (i, P - 1) and (i + 1, 0). The first is always a key after its
    query (masked), so reading it is harmless; writing through this view (the backward pass)
    must let the second win. The first T - 1 elements of each matrix are never part of it.
    """
    n = base.shape[0]
    return base.as_strided((n, num_queries, num_pos), (num_queries * num_pos, num_pos - 1, 1),
                           base.storage_offset() + num_queries - 1)


def _unshifted(padded: Tensor, num_queries: int) -> Tensor:
    """The gradient (N, T, K) of the per-distance position scores (column c = distance K-1-c),
    as a view of the score gradient ``padded`` (N, T + 1, K) of queries whose every key has a
    position, stored after a zero row: the transpose of :func:`_shifted`, ``g[n, i, c] =
    padded[n, 1 + i, c - (T - 1 - i)]``, with no copy.

    With row stride K + 1, row i reads its own keys from column T - 1 - i on (distances at
    most its own: keys at or before it); left of that it reads the end of the row before,
    keys after query i - 1, which are masked (score gradient 0), or for i = 0 the zero row.
    So every entry is the gradient of its distance, or 0 where the query has no key at it.
    """
    n, _, num_keys = padded.shape
    return padded.as_strided((n, num_queries, num_keys), (padded.stride(0), num_keys + 1, 1),
                             padded.storage_offset() + num_keys - (num_queries - 1))


def softmax_in_place(scores: Tensor) -> Tensor:
    """Softmax over the last dim, into ``scores``'s own storage on CPU (the kernel works row by
    row, so no (B H, T, K) temporary beside the scores; tested to equal the out-of-place
    softmax); elsewhere a new tensor."""
    if scores.device.type == "cpu":
        return torch.softmax(scores, dim=-1, out=scores)
    return torch.softmax(scores, dim=-1)


def _flatten_heads(qc, qp, k, v, scale):
    """Queries (both scaled), keys and values of the attention nodes as (B H, ., D) batches."""
    batch, heads, num_queries, dim = qc.shape
    n = batch * heads
    return ((qc * scale).reshape(n, num_queries, dim), (qp * scale).reshape(n, num_queries, dim),
            k.reshape(n, k.shape[-2], dim), v.reshape(n, v.shape[-2], v.shape[-1]))


def _backward_start(grad_out, out, qc3, qp3, k3, v3, r, need_r, r_transposed=False):
    """What both attention nodes' backward passes begin with: the output gradient as
    (B H, T, D), the softmax-backward row sums ``delta`` and the gradient tensors (``grad_r``
    zeroed, or None; (H, D, P) with ``r_transposed``). The softmax backward is dS = W * (dW -
    sum_j dW_ij W_ij), where the row sum is sum_j (dO_i . v_j) W_ij = dO_i . O_i, a (B H, T)
    product; pairs with weight 0 (masked) get score gradient 0."""
    grad_out = grad_out.reshape(out.shape).to(out.dtype)
    delta = (grad_out * out).sum(-1, keepdim=True)
    grads = (torch.empty_like(qc3), torch.empty_like(qp3), torch.empty_like(k3),
             torch.empty_like(v3),
             (r.new_zeros(r.shape[0], r.shape[2], r.shape[1]) if r_transposed
              else torch.zeros_like(r)) if need_r else None)
    return grad_out, delta, grads


def _backward_end(grad_qc, grad_qp, grad_k, grad_v, scale, batch, heads):
    """The query, key and value gradients as (B, H, ., D): the saved queries were scaled, so
    their gradients take the scale here."""
    return tuple(g.view(batch, heads, g.shape[1], -1)
                 for g in (grad_qc.mul_(scale), grad_qp.mul_(scale), grad_k, grad_v))


# score matrices per step of the blocked loops below: a block of (T, K) scores and its
# (T, P) position scores stay in cache while the mask, softmax and matmuls pass over them.
# Measured on the 2-core CPU (op forward + backward, alternated): 6 MiB against 8 MiB is
# 1.05x faster at Memory-XL's shapes with recompute (blocks of 4 heads instead of 8 at mem
# 256, 2 instead of 4 at mem 1024) and within 0.6% at Transformer-XL's and Compressive's
_BLOCK_BYTES = 6 << 20


def _head_blocks(batch: int, heads: int, matrix_bytes: int, device: torch.device):
    """Blocks of the B H score matrices, as ``(start, stop, b0, b1, h0, h1)``: heads ``h0:h1``
    of batch rows ``b0:b1`` are matrices ``start:stop`` of the (B H, ., .) layout. A block is
    either a few heads of one row or whole rows, so its heads are a slice of ``r``. On GPUs one
    block holds everything (their kernels want large batches, not cache)."""
    n = batch * heads
    want = n if device.type != "cpu" else max(1, _BLOCK_BYTES // max(matrix_bytes, 1))
    if want >= heads:
        rows = min(batch, want // heads)
        return [(b * heads, min(b + rows, batch) * heads, b, min(b + rows, batch), 0, heads)
                for b in range(0, batch, rows)]
    size = max(d for d in range(1, want + 1) if heads % d == 0)
    return [(b * heads + h, b * heads + h + size, b, b + 1, h, h + size)
            for b in range(batch) for h in range(0, heads, size)]


def _block_rows(block):
    """Slices of a block's matrices, one per batch row."""
    _, _, b0, b1, h0, h1 = block
    heads = h1 - h0
    return [slice(i * heads, (i + 1) * heads) for i in range(b1 - b0)]


def _block_positions(r: Tensor, blocks) -> Callable[[tuple], Tensor]:
    """``positions(block)``: ``r`` (H, P, D) for the matrices of a block, its heads (a view)
    or repeated over its batch rows (one copy per call, shared by the blocks)."""
    rows = max(b1 - b0 for _, _, b0, b1, _, _ in blocks)
    repeated = r.repeat(rows, 1, 1) if rows > 1 else None

    def positions(block):
        start, stop, b0, b1, h0, h1 = block
        return r[h0:h1] if b1 - b0 == 1 else repeated[: stop - start]

    return positions


# queries per chunk of a causal segment: chunk c of the queries sees only the keys up to its
# last query, so most of the masked upper triangle is never computed (with 4 chunks, 3/8 of
# it). Chunks only pay where the segment is at least half the keys (measured: Transformer-XL
# at seq 256 / mem 256 trains 1.06-1.07x faster; with a third of the keys, as Memory-XL's
# seq 256 / mem 256 / lmem 256, the smaller matmuls cost what the skipped keys save)
_QUERY_CHUNK = 64


def _query_chunks(num_queries: int, num_keys: int, num_pos: int, causal: bool):
    """Chunks of the queries as ``(q0, q1, keys, pos)``: queries ``q0:q1`` attend to the first
    ``keys`` keys, the last ``pos`` of which have positions (``r[:, -pos:]``). Each chunk is a
    relative attention of its own, aligned to the lower right like the whole."""
    worth_it = causal and 2 * num_queries >= num_keys
    chunks = max(1, min(4, num_queries // _QUERY_CHUNK)) if worth_it else 1
    bounds = [round(num_queries * c / chunks) for c in range(chunks + 1)]
    cut = num_queries  # keys (and positions) after a chunk's last query are never seen
    return [(q0, q1, num_keys - cut + q1, num_pos - cut + q1)
            for q0, q1 in zip(bounds[:-1], bounds[1:])]


def _chunk_mask(blocked: Tensor | None, q0: int, q1: int, num_queries: int):
    """The part of ``blocked`` (see relative_memory_attention) for queries ``q0:q1`` and the
    keys up to query ``q1 - 1``. ``blocked`` covers the last ``blocked.shape[-1]`` keys."""
    if blocked is None:
        return None
    dropped = num_queries - q1  # keys cut from the end
    return blocked[..., q0:q1, : blocked.shape[-1] - dropped]


class _RelativeAttention(torch.autograd.Function):
    """Forward and backward of :func:`relative_memory_attention` written out, over blocks of
    heads (:func:`_head_blocks`) and chunks of queries (:func:`_query_chunks`), so that the
    (T, K) work of a block happens in cache and keys after a chunk's last query are skipped:
    scores (content matmul, position scores added through the shift view, mask and softmax in
    place) then the output; in backward the score gradient, one copy back through the shift,
    and the four matmuls it feeds. The attention weights are the only (B, H, T, K)-sized
    tensors, kept for backward one block at a time (:func:`_kept_weights`), or not even they
    with ``recompute`` (backward rebuilds each block's weights just before using them). The
    generic path (shift view + baddbmm + masked_fill through autograd) makes several
    (B, H, T, K) tensors per layer."""

    @staticmethod
    def forward(ctx, qc, qp, k, v, r, blocked, scale, mode):
        # every input is already in one dtype (see relative_memory_attention); autocast would
        # only move the softmax to float32 and back
        with no_autocast(qc.device.type):
            return _RelativeAttention._forward(ctx, qc, qp, k, v, r, blocked, scale, mode)

    @staticmethod
    def _block_weights(w, qc, qp, k, r, blocked, pos_buf, block, shape):
        """Attention weights of one block and chunk into ``w`` (its (T, K) matrices); ``qc``
        and ``qp`` are already scaled, ``r`` is the block's and chunk's (P, D). Returns ``w``,
        or on GPUs the softmax's new tensor."""
        num_queries, num_keys, num_pos = shape
        _, _, b0, b1, h0, h1 = block
        if num_queries == 1 and num_pos == num_keys:  # one query: already aligned
            torch.bmm(qp, r.transpose(1, 2), out=w).baddbmm_(qc, k.transpose(1, 2))
        else:
            # position scores, then the content scores added to them through the shift in one
            # matmul where every key has a position (baddbmm copies the shifted view into w
            # first), else written once with the position scores added to their keys
            pos = (w.new_empty(w.shape[0], num_queries, num_pos) if pos_buf is None
                   else _buffer(pos_buf, w.shape[0], num_queries, num_pos))
            torch.bmm(qp, r.transpose(1, 2), out=pos)
            if num_queries > 1:
                pos = _shifted(pos, num_queries, num_pos)
            if num_pos == num_keys:
                torch.baddbmm(pos, qc, k.transpose(1, 2), out=w)
            else:
                torch.bmm(qc, k.transpose(1, 2), out=w)
                w[..., num_keys - num_pos:].add_(pos)
        if blocked is not None:
            # blocked covers the last blocked.shape[-1] keys (the segment's, when only the causal
            # mask applies): the pass over the scores skips the memory columns. A float mask is
            # a score bias of 0 and -inf (see _mask_as_score_bias)
            if blocked.dim() == 4:
                blocked = blocked[b0:b1]
            scores = w.view(b1 - b0, h1 - h0, num_queries, num_keys)[
                ..., num_keys - blocked.shape[-1]:]
            if blocked.dtype == torch.bool:
                scores.masked_fill_(blocked, float("-inf"))
            else:
                scores.add_(blocked)
        return softmax_in_place(w)

    @staticmethod
    def _forward(ctx, qc, qp, k, v, r, blocked, scale, mode):
        batch, heads, num_queries, dim = qc.shape
        num_keys, num_pos = k.shape[-2], r.shape[-2]
        n = batch * heads
        qc3, qp3, k3, v3 = _flatten_heads(qc, qp, k, v, scale)
        chunks = _query_chunks(num_queries, num_keys, num_pos, blocked is not None)
        rows = max(q1 - q0 for q0, q1, *_ in chunks)  # queries of the largest chunk
        blocks = _head_blocks(batch, heads, rows * num_keys * qc.element_size(), qc.device)
        largest = max(stop - start for start, stop, *_ in blocks)
        keep = mode == "keep"  # the weights are saved for backward (see _kept_weights)
        kept = _kept_weights(qc3, blocks, chunks) if keep else []
        w_buf = None if keep else qc3.new_empty(largest * rows * num_keys)
        pos_buf = qc3.new_empty(largest * rows * num_pos) if num_queries > 1 else None
        out = qc3.new_empty(n, num_queries, v.shape[-1])
        positions = _block_positions(r, blocks)
        for b, block in enumerate(blocks):
            start, stop = block[:2]
            r_block = positions(block)
            for c, (q0, q1, keys, pos) in enumerate(chunks):
                w = kept[b][c] if keep else _buffer(w_buf, stop - start, q1 - q0, keys)
                w = _RelativeAttention._block_weights(
                    w, qc3[start:stop, q0:q1], qp3[start:stop, q0:q1], k3[start:stop, :keys],
                    r_block[:, num_pos - pos:], _chunk_mask(blocked, q0, q1, num_queries), pos_buf,
                    block, (q1 - q0, keys, pos))
                if keep:  # (a softmax that is not in place, as on GPUs, made a new tensor)
                    kept[b][c] = w
                _bmm_into(w, v3[start:stop, :keys], out[start:stop, q0:q1])
        if mode == "recompute":  # backward rebuilds each block's weights the same way
            ctx.save_for_backward(qc3, qp3, k3, v3, r, out, blocked)
        elif keep:
            ctx.save_for_backward(qc3, qp3, k3, v3, r, out, *_flat(kept))
        ctx.mode = mode
        ctx.scale = scale
        ctx.chunks = chunks
        ctx.blocks = blocks
        ctx.shapes = (batch, heads, num_queries, num_keys, num_pos)
        return out.view(batch, heads, num_queries, -1)

    @staticmethod
    def backward(ctx, grad_out):
        batch, heads, num_queries, num_keys, num_pos = ctx.shapes
        if ctx.mode == "recompute":
            qc3, qp3, k3, v3, r, out, blocked = ctx.saved_tensors
            kept = None
        else:
            qc3, qp3, k3, v3, r, out, *kept = ctx.saved_tensors  # per block, per chunk
            kept = _unflat(kept, len(ctx.chunks))
            blocked = None
        with no_autocast(out.device.type):
            grad_out, delta, (grad_qc, grad_qp, grad_k, grad_v, grad_r) = _backward_start(
                grad_out, out, qc3, qp3, k3, v3, r, ctx.needs_input_grad[4], r_transposed=True)
            chunks, blocks = ctx.chunks, ctx.blocks
            rows = max(q1 - q0 for q0, q1, *_ in chunks)
            largest = max(stop - start for start, stop, *_ in blocks)
            # every key has a position in every chunk: the position gradient is a view of the
            # score gradient (_unshifted), which then gets a zero row before each matrix
            unshift = num_queries > 1 and num_keys == num_pos
            grad_buf = out.new_empty(largest * (rows + unshift) * num_keys)
            w_buf = out.new_empty(largest * rows * num_keys) if kept is None else None
            pos_buf = (out.new_empty(largest * rows * num_pos)
                       if num_queries > 1 and not (unshift and kept is not None) else None)
            g_buf = out.new_empty(largest * (rows + 1) * out.shape[-1]) if unshift else None
            positions = _block_positions(r, blocks)
            for b, block in enumerate(blocks):
                start, stop, b0, b1, h0, h1 = block
                size = stop - start
                r_block = positions(block)
                # the last chunk sees every key: it writes grad_k, grad_v (and grad_r) first,
                # the earlier chunks add to their leading keys
                mats = slice(start, stop)
                for c in reversed(range(len(chunks))):
                    q0, q1, keys, pos = chunks[c]
                    first = c == len(chunks) - 1
                    qc_c, qp_c = qc3[mats, q0:q1], qp3[mats, q0:q1]
                    k_c, v_c = k3[mats, :keys], v3[mats, :keys]
                    r_c = r_block[:, num_pos - pos:]
                    if kept is None:  # rebuilt like the forward pass did
                        w = _RelativeAttention._block_weights(
                            _buffer(w_buf, size, q1 - q0, keys), qc_c, qp_c, k_c, r_c,
                            _chunk_mask(blocked, q0, q1, num_queries), pos_buf, block,
                            (q1 - q0, keys, pos))
                    else:
                        w = kept[b][c]
                    g = grad_out[mats, q0:q1]
                    _bmm_into(w.transpose(1, 2), g, grad_v[mats, :keys], first)
                    # masked entries have weight 0, so their score gradient is 0
                    if unshift:  # a zero row before each matrix, from a zero row of g
                        g_zero = _buffer(g_buf, size, q1 - q0 + 1, g.shape[-1])
                        g_zero[:, 0].zero_()  # (chunks of other sizes moved the rows)
                        g_zero[:, 1:].copy_(g)
                        padded = torch.bmm(g_zero, v_c.transpose(1, 2),
                                           out=_buffer(grad_buf, size, q1 - q0 + 1, keys))
                        grad_scores = padded[:, 1:]
                    else:
                        grad_scores = torch.bmm(g, v_c.transpose(1, 2),
                                                out=_buffer(grad_buf, size, q1 - q0, keys))
                    grad_scores.sub_(delta[mats, q0:q1]).mul_(w)
                    _bmm_into(grad_scores, k_c, grad_qc[mats, q0:q1])
                    _bmm_into(grad_scores.transpose(1, 2), qc_c, grad_k[mats, :keys], first)
                    grad_pos_keys = grad_scores[..., keys - pos:]
                    if unshift:
                        grad_pos = _unshifted(padded, q1 - q0)
                    elif q1 - q0 > 1:
                        grad_pos = _buffer(pos_buf, size, q1 - q0, pos)
                        grad_pos[:, 0, : q1 - q0 - 1].zero_()  # never read by the shift view
                        view = _shifted(grad_pos, q1 - q0, pos)
                        view.copy_(grad_pos_keys)
                        # shared elements: the valid entry (i + 1, 0) must win over the masked
                        # (i, P - 1)
                        view[:, 1:, 0].copy_(grad_pos_keys[:, 1:, 0])
                    else:
                        grad_pos = grad_pos_keys
                    _bmm_into(grad_pos, r_c, grad_qp[mats, q0:q1])
                    if grad_r is not None:  # sums over the batch and the chunks
                        # one matmul over the block's matrices, as (D, P) per matrix, then
                        # the sum over its batch rows (not a (P, D) matmul per batch row)
                        per_matrix = torch.bmm(qp_c.transpose(1, 2), grad_pos)
                        target = grad_r[h0:h1, :, num_pos - pos:]
                        target.add_(per_matrix.view(b1 - b0, h1 - h0, -1, pos).sum(0)
                                    if b1 > b0 + 1 else per_matrix)
        if grad_r is not None:
            grad_r = grad_r.transpose(1, 2)
        return (*_backward_end(grad_qc, grad_qp, grad_k, grad_v, ctx.scale, batch, heads),
                grad_r, None, None, None)


def _kept_weights(like: Tensor, blocks, chunks) -> list[list[Tensor]]:
    """Empty tensors for the weights that the attention nodes keep for backward: one per block
    of heads and chunk of queries, ``(matrices, queries, keys)``. Kept as blocks, not as one
    (B H, T, K) tensor, so that each allocation stays under the size above which glibc maps
    fresh pages from the system for every call (and the kernel faults them in one page at a
    time on first write): a Compressive layer at mem 1024 keeps 50 MB, one block at most 6 MB."""
    return [[like.new_empty(stop - start, q1 - q0, keys) for q0, q1, keys, _ in chunks]
            for start, stop, *_ in blocks]


def _flat(kept: list[list[Tensor]]) -> list[Tensor]:
    """The kept weights as one list, for ``save_for_backward``; :func:`_unflat` undoes it."""
    return [w for per_block in kept for w in per_block]


def _unflat(flat, per_block: int) -> list[list[Tensor]]:
    return [list(flat[i: i + per_block]) for i in range(0, len(flat), per_block)]


def _buffer(flat: Tensor, *shape: int) -> Tensor:
    """A contiguous ``shape`` view of the start of the flat buffer ``flat``."""
    return flat[: math.prod(shape)].view(shape)


def _bmm_into(a: Tensor, b: Tensor, out: Tensor, overwrite: bool = True) -> None:
    """``out = a @ b`` or ``out += a @ b`` (batched). ``out`` may be a strided slice (a chunk
    of queries or keys), into which ``bmm(out=)`` and ``baddbmm_`` run one small matmul per
    matrix: the product is then formed apart and copied or added."""
    if out.is_contiguous():
        torch.bmm(a, b, out=out) if overwrite else out.baddbmm_(a, b)
    elif overwrite:
        out.copy_(torch.bmm(a, b))
    else:
        out.add_(torch.bmm(a, b))


def relative_memory_attention(
    q_content: Tensor,
    q_position: Tensor,
    k: Tensor,
    v: Tensor,
    r: Tensor,
    *,
    key_valid: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    score_bias: Tensor | None = None,
    recompute: bool = False,
) -> Tensor:
    """Causal Transformer-XL attention: scores ``scale (q_content_i . k_j + q_position_i .
    r[i + P - T - j])`` over K = M + T keys, where the P = ``r.shape[-2]`` last keys have
    relative positions (``r`` holds distances P-1, ..., 0, descending) and any K - P keys
    before them have none (score from content only).

    Args:
        q_content: (B, H, T, D) queries plus the content bias u.
        q_position: (B, H, T, D) queries plus the position bias v.
        k, v: (B, H or 1, K, D) keys and values, memory first.
        r: (H, P, D) projected embeddings of distances P-1, ..., 0, P <= K.
        key_valid: optional (B, K) bool, False for keys never to be seen (empty memory).
        scale: score scale, default ``1/sqrt(D)``.
        dropout_p: attention dropout (pass 0.0 in eval).
        score_bias: optional extra additive bias broadcastable to (B, H, T, K).
        recompute: do not keep the (B, H, T, K) attention weights for the backward pass (the
            largest activation of a layer with a long memory) but rebuild them there from the
            saved inputs, or, with dropout or ``score_bias``, by replaying the forward pass
            (``torch.utils.checkpoint``). Same results, for one more score computation and
            softmax per backward pass; the rebuilt weights exist one block of heads at a time.

    Without dropout or ``score_bias`` the work runs over blocks of heads of about 6 MiB of
    scores each (CPU), so only the kept weights reach (B, H, T, K); every other tensor of that
    size (position scores, score gradients) is one block, reused. A segment that is at least
    half of the keys runs in up to 4 chunks of queries, each skipping the keys after its last
    query (same results). A single query without autograd (a streamed token) goes to the fused
    attention kernel with its position scores as a score bias (:func:`_one_query_attention`).

    Returns:
        (B, H, T, D) attention output; equals :func:`relative_memory_attention_ref`.
    """
    _check_shapes(q_content, k, v)
    batch, heads, num_queries, dim = q_content.shape
    num_keys, num_pos = k.shape[-2], r.shape[-2]
    if not num_queries <= num_pos <= num_keys:
        raise ValueError(f"need T={num_queries} <= P={num_pos} <= K={num_keys} position embeddings")
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if dropout_p or score_bias is not None:  # the general path through autograd
        args = (q_content, q_position, k, v, r, key_valid, scale, dropout_p, score_bias)
        if recompute and torch.is_grad_enabled():
            # checkpoint replays the dropout masks (it restores the RNG state)
            return checkpoint(_general_relative_attention, *args, use_reentrant=False)
        return _general_relative_attention(*args)
    if k.shape[1] != heads:
        k = k.expand(-1, heads, -1, -1)
        v = v.expand(-1, heads, -1, -1)
    dtype = q_content.dtype
    # a single query (the last position) sees every key; otherwise only keys of the segment
    # (the last T) can be after a query, so the causal mask is (T, T) over those, unless some
    # memory keys are invalid and the mask must span all K
    blocked = None
    if num_queries > 1:
        mask_keys = num_keys if key_valid is not None else num_queries
        blocked = causal_blocked(num_queries, mask_keys, q_content.device)
    if key_valid is not None:
        invalid = ~key_valid[:, None, None, :]  # (B, 1, T, K)
        blocked = invalid if blocked is None else blocked | invalid
    # without autograd nothing is kept: the weights of one block at a time
    inputs = (q_content, q_position, k, v, r)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        if num_queries == 1:
            return _one_query_attention(q_content, q_position.to(dtype), k.to(dtype),
                                        v.to(dtype), r.to(dtype), key_valid, scale)
        mode = "none"
    else:
        mode = "recompute" if recompute else "keep"
    if blocked is not None:
        blocked = _mask_as_score_bias(blocked, dtype)
    return _RelativeAttention.apply(q_content, q_position.to(dtype), k.to(dtype), v.to(dtype),
                                    r.to(dtype), blocked, scale, mode)


def _mask_as_score_bias(blocked: Tensor, dtype: torch.dtype) -> Tensor:
    """``blocked`` (True: never seen) as a score bias of 0 and -inf in ``dtype``, which the
    attention nodes add to the scores: on the CPU an add runs several times faster than
    ``masked_fill_`` with a broadcast bool mask (0.03 vs 0.24 ms for (8, 256, 256) scores).
    A score of +inf would become NaN where ``masked_fill_`` would hide it, so float16 (whose
    scores can overflow) keeps the bool mask. The causal mask alone is cached."""
    if dtype == torch.float16:
        return blocked
    if blocked.dim() == 2:
        return _causal_score_bias(blocked.shape[0], blocked.shape[1], blocked.device, dtype)
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(
        blocked, float("-inf"))


@functools.lru_cache(maxsize=64)
def _causal_score_bias(num_queries: int, num_keys: int, device: torch.device,
                       dtype: torch.dtype) -> Tensor:
    """:func:`causal_blocked` as a score bias of 0 and -inf (cached; callers must not write
    to it)."""
    blocked = causal_blocked(num_queries, num_keys, device)
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill_(
        blocked, float("-inf"))


def _one_query_attention(qc, qp, k, v, r, key_valid, scale):
    """A streamed token's attention (one query, no autograd). Its keys' distances are P-1, ...,
    0 in order, so its position scores ``qp . r`` need no shift: they go to the fused kernel as
    a score bias (with the invalid keys' -inf), which makes the token's attention a matmul and
    one kernel call instead of the blocked node's dozen small operations."""
    batch, heads, _, dim = qc.shape
    num_keys, num_pos = k.shape[-2], r.shape[-2]
    bias = torch.matmul(qp * scale, r.transpose(1, 2))  # (B, H, 1, P)
    if num_pos < num_keys:  # keys without positions: content only
        bias = F.pad(bias, (num_keys - num_pos, 0))
    if key_valid is not None:
        bias = bias.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return F.scaled_dot_product_attention(qc, k, v, attn_mask=bias, scale=scale)


def _general_relative_attention(q_content, q_position, k, v, r, key_valid, scale, dropout_p,
                                score_bias):
    from memtx.ops.position import relative_position_scores

    num_keys, num_pos = k.shape[-2], r.shape[-2]
    pos = relative_position_scores(q_position * scale, r)
    pos = F.pad(pos, (num_keys - num_pos, 0)) if num_pos < num_keys else pos
    if score_bias is not None:
        pos = pos + score_bias
    return memory_attention(q_content, k, v, bias=pos, key_valid=key_valid, scale=scale,
                            dropout_p=dropout_p)


def relative_memory_attention_ref(
    q_content: Tensor,
    q_position: Tensor,
    k: Tensor,
    v: Tensor,
    r: Tensor,
    *,
    key_valid: Tensor | None = None,
    scale: float | None = None,
    score_bias: Tensor | None = None,
) -> Tensor:
    """Reference for :func:`relative_memory_attention`: the explicit distance matrix and the
    plain softmax."""
    from memtx.ops.position import relative_position_scores_ref

    scale = 1.0 / math.sqrt(q_content.shape[-1]) if scale is None else scale
    pos = relative_position_scores_ref(q_position * scale, r)
    pos = F.pad(pos, (k.shape[-2] - r.shape[-2], 0))
    if score_bias is not None:
        pos = pos + score_bias
    return memory_attention_ref(q_content, k, v, bias=pos, key_valid=key_valid, scale=scale)


# ============================================================================================
# Relative attention at per-pair distances (memories whose entries are not contiguous)
# ============================================================================================
class _PairwiseRelativeAttention(torch.autograd.Function):
    """Forward and backward of :func:`pairwise_relative_attention` written out, over blocks of
    heads (:func:`_head_blocks`) and, with ``causal``, chunks of queries (:func:`_query_chunks`)
    so that a block's work happens in cache and keys after a chunk's last query are skipped:
    per block the position table ``qp . r`` (T, N) is made in one reused buffer, gathered at
    the pairs' distances into the scores, the score bias added and the content matmul
    accumulated in place, then the softmax in place; in backward the softmax gradient is
    formed in place from ``dO . O`` row sums and the table gradient is one scatter-add into
    the reused buffer. The attention weights are the only (B, H, T, K) tensor. Through
    autograd the same computation makes about three more (B, H, T, K) tensors per layer (the
    bias sum, the masked copy, the softmax backward) and a zero-filled (B, H, T, N) scatter
    target for the gather."""

    @staticmethod
    def forward(ctx, qc, qp, k, v, r, distances, bias, scale, causal):
        with no_autocast(qc.device.type):
            batch, heads, num_queries, dim = qc.shape
            num_keys, num_dist = k.shape[-2], r.shape[-2]
            n = batch * heads
            qc3, qp3, k3, v3 = _flatten_heads(qc, qp, k, v, scale)
            # chunks of queries see the keys up to their last query (see _query_chunks)
            chunks = _query_chunks(num_queries, num_keys, num_keys, causal)
            rows = max(q1 - q0 for q0, q1, *_ in chunks)
            blocks = _head_blocks(batch, heads, rows * max(num_keys, num_dist) * qc.element_size(),
                                  qc.device)
            largest = max(stop - start for start, stop, *_ in blocks)
            table_buf = qc3.new_empty(largest * rows * num_dist)
            kept = _kept_weights(qc3, blocks, chunks)
            out = qc3.new_empty(n, num_queries, v.shape[-1])
            positions = _block_positions(r, blocks)
            for b, block in enumerate(blocks):
                start, stop, b0, b1, h0, h1 = block
                r_t = positions(block).transpose(1, 2)
                for c, (q0, q1, keys, _) in enumerate(chunks):
                    shape4 = (b1 - b0, h1 - h0, q1 - q0)
                    table = torch.bmm(qp3[start:stop, q0:q1], r_t,
                                      out=_buffer(table_buf, stop - start, q1 - q0, num_dist))
                    index = distances[b0:b1, None, q0:q1, :keys].expand(*shape4, keys)
                    w = kept[b][c]
                    torch.gather(table.view(*shape4, num_dist), -1, index,
                                 out=w.view(*shape4, keys))
                    w.view(*shape4, keys).add_(bias[b0:b1, None, q0:q1, :keys])
                    w.baddbmm_(qc3[start:stop, q0:q1], k3[start:stop, :keys].transpose(1, 2))
                    # (a softmax that is not in place, as on GPUs, makes a new tensor)
                    w = kept[b][c] = softmax_in_place(w)
                    _bmm_into(w, v3[start:stop, :keys], out[start:stop, q0:q1])
        ctx.save_for_backward(qc3, qp3, k3, v3, r, out, distances, *_flat(kept))
        ctx.scale = scale
        ctx.chunks = chunks
        ctx.blocks = blocks
        ctx.shape = (batch, heads, num_queries, num_keys, num_dist)
        return out.view(batch, heads, num_queries, -1)

    @staticmethod
    def backward(ctx, grad_out):
        batch, heads, num_queries, num_keys, num_dist = ctx.shape
        qc3, qp3, k3, v3, r, out, distances, *kept = ctx.saved_tensors
        chunks, blocks = ctx.chunks, ctx.blocks
        kept = _unflat(kept, len(chunks))
        with no_autocast(out.device.type):
            # pairs with bias -inf have weight 0 and get score gradient 0
            grad_out, delta, (grad_qc, grad_qp, grad_k, grad_v, grad_r) = _backward_start(
                grad_out, out, qc3, qp3, k3, v3, r, ctx.needs_input_grad[4])
            grad_bias = (out.new_zeros(batch, num_queries, num_keys)
                         if ctx.needs_input_grad[6] else None)
            rows = max(q1 - q0 for q0, q1, *_ in chunks)
            largest = max(stop - start for start, stop, *_ in blocks)
            grad_buf = out.new_empty(largest * rows * num_keys)
            table_buf = out.new_empty(largest * rows * num_dist)
            positions = _block_positions(r, blocks)
            for b, block in enumerate(blocks):
                start, stop, b0, b1, h0, h1 = block
                size, r_block = stop - start, positions(block)
                # the last chunk sees every key: it writes grad_k and grad_v first
                for c in reversed(range(len(chunks))):
                    q0, q1, keys, _ = chunks[c]
                    first = c == len(chunks) - 1
                    shape4 = (b1 - b0, h1 - h0, q1 - q0)
                    w, g = kept[b][c], grad_out[start:stop, q0:q1]
                    qc_c, qp_c = qc3[start:stop, q0:q1], qp3[start:stop, q0:q1]
                    _bmm_into(w.transpose(1, 2), g, grad_v[start:stop, :keys], first)
                    grad_scores = torch.bmm(g, v3[start:stop, :keys].transpose(1, 2),
                                            out=_buffer(grad_buf, size, q1 - q0, keys))
                    grad_scores.sub_(delta[start:stop, q0:q1]).mul_(w)
                    if grad_bias is not None:  # shared by the heads
                        grad_bias[b0:b1, q0:q1, :keys] += grad_scores.view(*shape4, keys).sum(1)
                    _bmm_into(grad_scores, k3[start:stop, :keys], grad_qc[start:stop, q0:q1])
                    _bmm_into(grad_scores.transpose(1, 2), qc_c, grad_k[start:stop, :keys], first)
                    index = distances[b0:b1, None, q0:q1, :keys].expand(*shape4, keys)
                    grad_table = _buffer(table_buf, size, q1 - q0, num_dist).zero_()
                    grad_table.view(*shape4, num_dist).scatter_add_(
                        -1, index, grad_scores.view(*shape4, keys))
                    _bmm_into(grad_table, r_block, grad_qp[start:stop, q0:q1])
                    if grad_r is not None:  # sums over the batch and the chunks, in place
                        for row in _block_rows(block):
                            grad_r[h0:h1].baddbmm_(grad_table[row].transpose(1, 2), qp_c[row])
        return (*_backward_end(grad_qc, grad_qp, grad_k, grad_v, ctx.scale, batch, heads),
                grad_r, None, grad_bias, None, None)


def pairwise_relative_attention(
    q_content: Tensor,
    q_position: Tensor,
    k: Tensor,
    v: Tensor,
    r: Tensor,
    distances: Tensor,
    bias: Tensor,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
    causal: bool = False,
) -> Tensor:
    """Attention whose every (query, key) pair has its own relative distance:
    ``softmax_j(scale (q_content_i . k_j + q_position_i . r[distances[i, j]]) + bias[i, j])``.

    This is Transformer-XL attention for memories whose entries are no longer contiguous in time
    (dropped entries, rows of different ages), where the shift of :func:`relative_memory_attention`
    cannot place the distances.

    Args:
        q_content: (B, H, T, D) queries plus the content bias u.
        q_position: (B, H, T, D) queries plus the position bias v.
        k, v: (B, H or 1, K, D) keys and values.
        r: (H, N, D) projected embeddings of the distances 0, 1, ..., N-1 (ascending).
        distances: (B, T, K) long in [0, N), the distance of each pair.
        bias: (B, T, K) additive score bias shared by the heads, ``-inf`` for pairs that must
            not be seen; it carries every mask, the causal one included, and receives a
            gradient. Every query needs at least one finite entry.
        scale: score scale, default ``1/sqrt(D)``.
        dropout_p: attention dropout (pass 0.0 in eval); with dropout the computation runs
            through autograd.
        causal: the last T keys are the segment's and ``bias`` hides from each query the
            segment keys after it (lower-right aligned, as in :func:`relative_memory_attention`).
            The results do not change; the op may then skip those keys (chunks of queries).

    A single query without autograd (a streamed token) goes to the fused attention kernel, its
    gathered position scores and ``bias`` as the score bias.

    Returns:
        (B, H, T, D); equals :func:`pairwise_relative_attention_ref`.
    """
    from memtx.ops.position import gather_position_scores

    _check_shapes(q_content, k, v)
    batch, heads, num_queries, dim = q_content.shape
    pair_shape = (batch, num_queries, k.shape[-2])
    if tuple(distances.shape) != pair_shape or tuple(bias.shape) != pair_shape:
        raise ValueError(
            f"distances {tuple(distances.shape)} and bias {tuple(bias.shape)} must both be "
            f"(B, T, K) = {pair_shape}"
        )
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    dtype = q_content.dtype
    if k.shape[1] != heads:
        k = k.expand(-1, heads, -1, -1)
        v = v.expand(-1, heads, -1, -1)
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q_content, q_position, k, v, r, bias))
    if dropout_p or (num_queries == 1 and not grad):
        # the whole score bias at once: with dropout through autograd, for a streamed token
        # (one query, no autograd) as the bias of one fused-kernel call
        scores = gather_position_scores(q_position * scale, r, distances) + bias[:, None]
        if dropout_p:
            return memory_attention(q_content, k, v, bias=scores, scale=scale,
                                    dropout_p=dropout_p, causal=False)
        return F.scaled_dot_product_attention(q_content, k.to(dtype), v.to(dtype),
                                              attn_mask=scores.to(dtype), scale=scale)
    return _PairwiseRelativeAttention.apply(
        q_content, q_position.to(dtype), k.to(dtype), v.to(dtype), r.to(dtype), distances,
        bias.to(dtype), scale, causal and num_queries > 1,
    )


def pairwise_relative_attention_ref(
    q_content: Tensor,
    q_position: Tensor,
    k: Tensor,
    v: Tensor,
    r: Tensor,
    distances: Tensor,
    bias: Tensor,
    *,
    scale: float | None = None,
) -> Tensor:
    """Reference for :func:`pairwise_relative_attention`: per-pair position scores from an
    explicit loop, the bias added, the plain softmax."""
    from memtx.ops.position import gather_position_scores_ref

    scale = 1.0 / math.sqrt(q_content.shape[-1]) if scale is None else scale
    k = k.expand(-1, q_content.shape[1], -1, -1)
    v = v.expand(-1, q_content.shape[1], -1, -1)
    scores = torch.einsum("bhid,bhjd->bhij", q_content, k) * scale
    scores = scores + gather_position_scores_ref(q_position * scale, r, distances) + bias[:, None]
    return torch.einsum("bhij,bhjd->bhid", scores.softmax(dim=-1), v)
