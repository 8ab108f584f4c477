"""Fast forms of the GateLoop recurrence: chunkwise-parallel (training) and one-step (generation).

GateLoop (Katsch 2023), per batch element and head, with a complex state ``S_t`` (Dk x Dv)::

    S_t   = a_t * S_{t-1} + k_t^T v_t        (a_t: complex scalar, |a_t| in (0, 1))
    out_t = Re(q_t S_t) = q_t Re(S_t)        (q_t, k_t, v_t real row vectors)

Forms:

* ``gate_loop_chunked``: chunkwise-parallel, for training. Within a chunk the decays form a
  masked (C x C) matrix and the work is real matmuls (or, for tiny heads, the recurrence stepped
  over chunk positions for all chunks at once); the complex state is carried from chunk to
  chunk by a short loop.
* ``gate_loop_channels``: one channel per head (Dk = Dv = 1, GateLoop's default), in the
  model's (B, T, H) layout: the scalar recurrence stepped over chunks, forward and backward each
  one chunked scan in a single autograd node.
* ``gate_loop_step``: recurrent, constant cost per token, for generation.
* ``gate_loop``: dispatcher over these and the references in ``memtx.ops.scan_ref``, with an
  optional finiteness-checking mode.

Shapes (the same layout in every form of this package)::

    B  batch            H  heads           T  time (sequence length)
    Dk key/query dim    Dv value dim       C  chunk size      N  number of chunks = ceil(T / C)

    q               (B, H, T, Dk)   real
    k               (B, H, T, Dk)   real
    v               (B, H, T, Dv)   real
    a               (B, H, T)       complex, |a| in (0, 1]
                    or a pair (log_magnitude, phase), each (B, H, T) real,
                    meaning a = exp(log_magnitude) * exp(i * phase)
    initial_state   (B, H, Dk, Dv)  complex, or None for zeros
    out             (B, H, T, Dv)   real
    final_state     (B, H, Dk, Dv)  complex

Computation runs in the inputs' promoted dtype but at least float32; ``out`` comes back in the
inputs' promoted dtype, ``final_state`` as the complex counterpart of the compute dtype.
"""

from __future__ import annotations

import math
from typing import Literal, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from memtx.ops.autocast import no_autocast
from memtx.ops.scan_ref import (
    Gate,
    complex_dtype,
    compute_dtype,
    gate_complex,
    gate_log_parts,
    gate_loop_associative_scan_ref,
    gate_loop_sequential_ref,
    initial_state_or_zeros,
    output_dtype,
    validate_channel_inputs,
    validate_inputs,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "Gate",
    "default_chunk_size",
    "gate_loop",
    "gate_loop_channels",
    "gate_loop_chunked",
    "gate_loop_step",
    "uses_recurrent_form",
]

DEFAULT_CHUNK_SIZE = 64

# States with at most this many entries (Dk * Dv) use the recurrent intra-chunk strategy: the
# (C x C) decay matrix costs O(C) per token while a tiny state costs O(Dk * Dv), and batched
# matmuls of tiny matrices are slow on CPU. Measured (CPU, fp32, dim 256): recurrent is faster
# up to head dim 4 (232 vs 267 ms), matmul from head dim 8 (160 vs 468 ms).
_RECURRENT_MAX_STATE = 16

IntraMode = Literal["auto", "matmul", "recurrent"]


def _resolve_intra(intra: IntraMode, Dk: int, Dv: int) -> str:
    if intra == "auto":
        return "recurrent" if Dk * Dv <= _RECURRENT_MAX_STATE else "matmul"
    if intra not in ("matmul", "recurrent"):
        raise ValueError(f"intra must be 'auto', 'matmul' or 'recurrent', got {intra!r}")
    return intra


def uses_recurrent_form(dk: int, dv: int) -> bool:
    """Whether :func:`gate_loop_chunked` steps the recurrence (tiny states) rather than forming
    decay matrices; it then takes complex gates as they are, where the matmul form wants
    ``(log|a|, angle(a))``."""
    return _resolve_intra("auto", dk, dv) == "recurrent"


def default_chunk_size(dk: int, dv: int | None = None, intra: IntraMode = "auto") -> int:
    """Chunk size that measured fastest (forward + backward, CPU fp32, B=4, T=1024).

    The matmul strategy's intra-chunk cost per token grows like C * (Dk + Dv) plus a few
    elementwise passes over C values, while the per-chunk state work is Dk * Dv / C per token,
    so the best C grows with the head size: about 2 * sqrt(Dk * Dv), rounded up to a power of
    two, within [8, 64] (measured: 8 for head dim 4, 16 for 8, 32 for 16, 64 for 32 and 64).
    The recurrent strategy (tiny states) does C + N sequential steps; C = 64 was as fast as
    16-128 and keeps each step's tensor small enough that a busy CPU does not pay a thread
    wake-up on every step.
    """
    dv = dk if dv is None else dv
    if _resolve_intra(intra, dk, dv) == "recurrent":
        return 64
    target = 2.0 * math.sqrt(dk * dv)
    return int(min(64, max(8, 2 ** math.ceil(math.log2(target)))))


def gate_loop_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Gate,
    initial_state: Tensor | None = None,
    chunk_size: int | None = None,
    *,
    intra: IntraMode = "auto",
) -> Tuple[Tensor, Tensor]:
    """GateLoop in chunkwise-parallel form, for training; differentiable by plain autograd.

    The sequence is cut into N chunks of C steps. Each chunk's own contribution is computed for
    all chunks at once; the complex state entering each chunk is then carried by a loop over the
    N chunks (elementwise on (B, H, Dk, Dv)), and its effect added to every position. T need not
    be a multiple of C: the tail is padded with a = 1 and zero q/k/v, which leaves the state
    unchanged.

    Two intra-chunk strategies (``intra``):

    * "matmul" (default for Dk * Dv > 16): the decay matrix D[i, j] = prod_{j<s<=i} a_s in log
      space, D[i, j] = exp(Ls[i, j]) * exp(i Ts[i, j]) with Ls/Ts the sums of log|a| / angle(a)
      over (j, i]. Only the magnitude can overflow, and it is exponentiated only where j <= i
      (masked to -inf first), where Ls <= 0. Since q, k, v are real, only Re(D) = exp(Ls)
      cos(Ts) matters inside a chunk, so the intra-chunk term is real matmuls; the carried
      state is complex but enters as [Re S; -Im S] in a real matmul too.
    * "recurrent" (default for tiny states, e.g. head dim 1..4): the recurrence itself, stepped
      over the C positions of all chunks at once (2C + N sequential elementwise steps instead
      of T: one pass for the chunk summaries, one from the true entering states), with gates
      multiplied directly; products of |a| <= 1 only shrink, so this needs no log space.

    Args:
        q, k: (B, H, T, Dk) real.  v: (B, H, T, Dv) real.
        a: (B, H, T) complex with |a| > 0 (and <= 1 to stay bounded), or a pair
            (log_magnitude, phase) of (B, H, T) real tensors.
        initial_state: (B, H, Dk, Dv) complex, or None for zeros.
        chunk_size: C; None picks ``default_chunk_size(Dk, Dv, intra)``.
        intra: "auto", "matmul" or "recurrent" (see above).

    Returns:
        out (B, H, T, Dv) real, final_state (B, H, Dk, Dv) complex.
    """
    with no_autocast(q.device.type):  # the documented compute dtype, also under autocast
        return _gate_loop_chunked(q, k, v, a, initial_state, chunk_size, intra)


def _gate_loop_chunked(
    q: Tensor, k: Tensor, v: Tensor, a: Gate, initial_state: Tensor | None,
    chunk_size: int | None, intra: IntraMode,
) -> Tuple[Tensor, Tensor]:
    B, H, T, Dk, Dv = validate_inputs(q, k, v, a, initial_state)
    mode = _resolve_intra(intra, Dk, Dv)
    if chunk_size is None:
        chunk_size = default_chunk_size(Dk, Dv, mode)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    dt = compute_dtype(q, k, v)
    state = initial_state_or_zeros(initial_state, B, H, Dk, Dv, dt, q.device)
    if T == 0:
        return v.new_zeros(B, H, 0, Dv).to(output_dtype(q, k, v)), state

    C = min(chunk_size, T)
    N = math.ceil(T / C)
    pad = N * C - T
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    if pad:
        qf = F.pad(qf, (0, 0, 0, pad))
        kf = F.pad(kf, (0, 0, 0, pad))
        vf = F.pad(vf, (0, 0, 0, pad))
    qf = qf.reshape(B, H, N, C, Dk)
    kf = kf.reshape(B, H, N, C, Dk)
    vf = vf.reshape(B, H, N, C, Dv)

    if mode == "matmul":
        log_mag, phase = gate_log_parts(a, dt)
        if pad:
            # log a = 0 is a = 1: the padding leaves the state intact.
            log_mag = F.pad(log_mag, (0, pad))
            phase = F.pad(phase, (0, pad))
        out, final_state = _chunked_matmul(
            qf, kf, vf, log_mag.reshape(B, H, N, C), phase.reshape(B, H, N, C), state
        )
    else:
        gate = gate_complex(a, dt)
        if pad:
            gate = F.pad(gate, (0, pad), value=1.0)
        out, final_state = _chunked_recurrent(qf, kf, vf, gate.reshape(B, H, N, C), state)

    out = out.reshape(B, H, N * C, Dv)[:, :, :T]
    return out.to(output_dtype(q, k, v)), final_state


def _carry_state(
    chunk_decay: Tensor, summary: Tensor, state: Tensor, dim: int = 2, reverse: bool = False
) -> Tuple[Tensor, Tensor]:
    """Run S_n = A_n S_{n-1} + U_n over the chunks along ``dim`` (from the last chunk to the
    first when ``reverse``).

    chunk_decay and summary hold A_n and U_n (chunk_decay broadcasting against summary), state
    is the state entering the first chunk run. Returns the states entering each chunk (stacked
    along ``dim``) and the final state.
    """
    # unbind, not indexing: each indexed slice's backward would materialise a full-size zero
    # gradient, making the backward quadratic in N.
    steps = list(zip(chunk_decay.unbind(dim), summary.unbind(dim)))
    starts = []
    for decay_n, summary_n in reversed(steps) if reverse else steps:
        starts.append(state)
        state = decay_n * state + summary_n
    if reverse:
        starts.reverse()
    return torch.stack(starts, dim=dim), state


def _scan_chunks_(
    gate: Tensor, h: Tensor, state: Tensor, time_dim: int, chunk_dim: int, reverse: bool = False
) -> Tensor:
    """``h_t = a_t h_{t-1} + u_t`` in place, chunk by chunk (no autograd); returns the last state.

    ``h`` (complex) holds the inputs ``u`` and receives the states. Within a chunk time runs
    along ``time_dim`` (C steps); the chunks lie along ``chunk_dim`` of each time step's slice.
    ``gate`` broadcasts against ``h``; ``state`` enters the first chunk. Two passes over the C
    positions of all chunks at once: the chunk summaries from zero states, then, after the
    short loop over chunks, each chunk again from its true entering state. With ``reverse``
    time runs backwards (``h_t = a_t h_{t+1} + u_t``, ``state`` entering the last position).
    Products of |a| <= 1 only shrink, so this needs no log space.
    """
    a_steps, u_steps = gate.unbind(time_dim), h.unbind(time_dim)
    order = range(len(u_steps) - 1, -1, -1) if reverse else range(len(u_steps))
    summary = u_steps[order[0]].clone()
    for c in order[1:]:
        summary.mul_(a_steps[c]).add_(u_steps[c])
    chunk_decay = torch.prod(gate, dim=time_dim)
    s, final_state = _carry_state(chunk_decay, summary, state, chunk_dim, reverse)
    for c in order:
        s = u_steps[c].addcmul_(a_steps[c], s)
    return final_state


def _wrap_phase(theta: Tensor) -> Tensor:
    # Phases only enter through cos/sin; wrapping to [-pi, pi) before rounding to the compute
    # dtype keeps fp32 angles accurate to ~1e-7 however far the cumulative sum has wandered.
    return torch.remainder(theta + math.pi, 2 * math.pi) - math.pi


def _segment_sums(x: Tensor) -> Tensor:
    """x (..., C) -> (..., C, C) with [i, j] = sum_{j<s<=i} x_s (so 0 on and above the
    diagonal). Each entry sums its own terms: no cancellation between large cumulative sums."""
    C = x.shape[-1]
    below = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1)  # [s, j]: s > j
    terms = x[..., :, None].expand(*x.shape, C).masked_fill(~below, 0.0)  # [s, j] = x_s [s > j]
    return terms.cumsum(-2)  # [i, j] = sum_{s<=i} x_s [s > j]


def _intra_chunk(q: Tensor, k: Tensor, v: Tensor, log_mag: Tensor, phase: Tensor) -> Tensor:
    """Each chunk's own term of the matmul strategy: (B, H, N, C, Dv), inputs as in
    :func:`_chunked_matmul`."""
    C = q.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    log_decay = _segment_sums(log_mag).masked_fill(~causal, -math.inf)  # (B, H, N, C, C)
    decay = torch.exp(log_decay) * torch.cos(_segment_sums(phase))
    scores = torch.matmul(q, k.transpose(-1, -2)) * decay  # (B, H, N, C, C)
    return torch.matmul(scores, v)  # (B, H, N, C, Dv)


def _chunked_matmul(
    q: Tensor, k: Tensor, v: Tensor, log_mag: Tensor, phase: Tensor, state: Tensor
) -> Tuple[Tensor, Tensor]:
    """Matmul strategy. q, k (B, H, N, C, Dk), v (B, H, N, C, Dv), log_mag/phase (B, H, N, C)
    real, state (B, H, Dk, Dv) complex. Returns out (B, H, N, C, Dv), final state."""
    dt = q.dtype
    # Chunk-local cumulative sums (so they stay bounded by C terms), taken in float64: they are
    # only (B, H, N, C), and differences of them below then carry no fp32 rounding of the sums.
    lc = log_mag.to(torch.float64).cumsum(-1)  # (B, H, N, C)
    thc = phase.to(torch.float64).cumsum(-1)  # (B, H, N, C)
    L = lc.to(dt)
    th = _wrap_phase(thc).to(dt)

    # Intra-chunk: sum_{j<=i} Re(D_ij) (q_i.k_j) v_j with Re(D_ij) = exp(Ls_ij) cos(Ts_ij), where
    # Ls/Ts are segment sums over (j, i] of log|a| / angle(a). Summing each segment directly
    # (rather than differencing cumulative sums) means no cancellation in the forward pass or
    # in the gate gradients, which otherwise drown when |a| << 1 sits next to |a| ~ 1.
    if torch.is_grad_enabled():
        # recomputed in backward: autograd would keep about eight (B, H, N, C, C) tensors
        # (segment sums, decays, scores), most of the op's activations, for a recompute that
        # costs one more pass of this block
        out = checkpoint(_intra_chunk, q, k, v, log_mag, phase, use_reentrant=False)
    else:
        out = _intra_chunk(q, k, v, log_mag, phase)

    # Chunk summaries U_n = sum_j exp(c_end - c_j) k_j^T v_j with c = L + i Th:
    # Re/Im parts are (k_j * exp(L_end - L_j) * cos/sin(Th_end - Th_j))^T v.
    to_end = torch.exp(lc[..., -1:] - lc).to(dt)  # (B, H, N, C), <= 1
    rot = _wrap_phase(thc[..., -1:] - thc).to(dt)  # (B, H, N, C)
    k_end = k * to_end[..., None]
    k_end = torch.cat([k_end * rot.cos()[..., None], k_end * rot.sin()[..., None]], dim=-1)
    xy = torch.matmul(k_end.transpose(-1, -2), v)  # (B, H, N, 2Dk, Dv)
    Dk = q.shape[-1]
    summary = torch.complex(xy[..., :Dk, :], xy[..., Dk:, :])  # (B, H, N, Dk, Dv)
    chunk_decay = torch.polar(torch.exp(lc[..., -1]), thc[..., -1]).to(state.dtype)
    starts, final_state = _carry_state(chunk_decay[..., None, None], summary, state)

    # Inter-chunk: Re(q_i exp(c_i) S) = exp(L_i) [q_i cos Th_i, q_i sin Th_i] @ [Re S; -Im S].
    from_start = torch.exp(L)[..., None]  # (B, H, N, C, 1)
    qr = torch.cat([q * (from_start * th.cos()[..., None]), q * (from_start * th.sin()[..., None])],
                   dim=-1)  # (B, H, N, C, 2Dk)
    s_real = torch.cat([starts.real, -starts.imag], dim=-2)  # (B, H, N, 2Dk, Dv)
    out = out + torch.matmul(qr, s_real)  # (B, H, N, C, 2Dk) @ (B, H, N, 2Dk, Dv)
    return out, final_state


def _scan_states(gate: Tensor, u: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
    """Every state of ``h_t = a_t h_{t-1} + u_t`` (no autograd).

    gate (B, H, N, C) complex, u (B, H, N, C, Dk, Dv) complex, state (B, H, Dk, Dv) complex
    entering the first chunk. Returns the states (B, H, N, C, Dk, Dv) (time-major storage) and
    the last one (see :func:`_scan_chunks_`).
    """
    # C x (B, H, N, Dk, Dv), each step one contiguous slab (a copy: the passes write into it)
    steps = u.movedim(3, 0).clone(memory_format=torch.contiguous_format)
    final_state = _scan_chunks_(gate.movedim(3, 0)[..., None, None], steps, state, 0, 2)
    return steps.movedim(0, 3), final_state


class _RecurrentScan(torch.autograd.Function):
    """``h_t = a_t h_{t-1} + u_t`` over chunks, returning every state and the last: forward
    and backward are each one :func:`_scan_states`, the backward one running backwards in time
    with the conjugate gates (``G_t = dH_t + conj(a_{t+1}) G_{t+1}``). Saves the gates, the
    entering state and the states it returns; through autograd, the 2C steps of the two passes
    would each keep their own (B, H, N, Dk, Dv) tensors."""

    @staticmethod
    def forward(ctx, gate: Tensor, u: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        states, final_state = _scan_states(gate, u, state)
        ctx.save_for_backward(gate, state, states)
        return states, final_state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states: Tensor | None, grad_final: Tensor | None):
        gate, state, states = ctx.saved_tensors
        B, H, N, C = gate.shape
        if grad_states is None:
            grad_states = torch.zeros_like(states)
        if grad_final is None:
            grad_final = torch.zeros_like(state)
        # reversed time: G'_t = b_t G'_{t-1} + dH'_t with b_t = conj(a) of the step after, and
        # G'_{-1} = dL/dh_last entering through b_0 = 1
        flipped = gate.reshape(B, H, N * C).flip(-1).conj()
        b = torch.cat((torch.ones_like(flipped[..., :1]), flipped[..., :-1]), dim=-1)
        grads, _ = _scan_states(b.reshape(B, H, N, C), grad_states.flip(2, 3), grad_final)
        grads = grads.flip(2, 3)  # (B, H, N, C, Dk, Dv): dL/dh_t, all paths
        # the state before each step: the entering state, then every state but the last
        flat = states.reshape(B, H, N * C, *states.shape[-2:])
        previous = torch.cat((state[:, :, None], flat[:, :, :-1]), dim=2).reshape(states.shape)
        grad_gate = (grads * previous.conj()).sum((-2, -1))
        grad_state = gate[:, :, 0, 0, None, None].conj() * grads[:, :, 0, 0]
        return grad_gate, grads, grad_state


def _chunked_recurrent(
    q: Tensor, k: Tensor, v: Tensor, gate: Tensor, state: Tensor
) -> Tuple[Tensor, Tensor]:
    """Recurrent strategy for tiny states. q, k (B, H, N, C, Dk), v (B, H, N, C, Dv) real,
    gate (B, H, N, C) complex, state (B, H, Dk, Dv) complex. Returns out (B, H, N, C, Dv)."""
    u = (k[..., :, None] * v[..., None, :]).to(gate.dtype)  # (B, H, N, C, Dk, Dv)
    states, final_state = _RecurrentScan.apply(gate, u, state)
    out = (q[..., :, None] * states.real).sum(-2)  # (B, H, N, C, Dv)
    return out, final_state


# ---------------------------------------------------------------------------------------------
# One channel per head
# ---------------------------------------------------------------------------------------------

# Chunk length of gate_loop_channels: C + N sequential steps per pass, each over (B, N, H).
_CHANNEL_CHUNK = 64
# Without autograd, up to this many tokens (generation) are stepped one by one instead.
_CHANNEL_STEPS = 4


class _ChannelScan(torch.autograd.Function):
    """GateLoop with scalar states: ``h_t = a_t h_{t-1} + k_t v_t``, ``out_t = q_t Re(h_t)`` on
    (B, T, H), as one node. Forward and backward are each one chunked scan
    (:func:`_scan_chunks_`) in the (B, T, H) layout, the backward one running backwards in time
    with the conjugate gates (``g_t = dh_t + conj(a_{t+1}) g_{t+1}``). Saves q, k, v, the
    gates, the entering state and the states."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, gate: Tensor, state: Tensor):
        B, T, H = q.shape
        C = min(_CHANNEL_CHUNK, T)
        N = -(-T // C)
        h = q.new_zeros(B, N * C, H, dtype=gate.dtype)
        torch.mul(k, v, out=h.real[:, :T])
        if N * C > T:  # a = 1, u = 0 on the padding: the state passes through unchanged
            gate = torch.cat((gate, gate.new_ones(B, N * C - T, H)), dim=1)
        final_state = _scan_chunks_(gate.view(B, N, C, H), h.view(B, N, C, H), state, 2, 1)
        ctx.save_for_backward(q, k, v, gate, state, h)
        ctx.chunks = N, C
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return q * h.real[:, :T], final_state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor | None, grad_final: Tensor | None):
        q, k, v, gate, state, h = ctx.saved_tensors
        B, T, H = q.shape
        N, C = ctx.chunks
        states = h[:, :T]
        g = torch.zeros_like(h)  # dL/dh_t over all paths, built in place by the reverse scan
        grad_q = torch.zeros_like(q) if grad_out is None else grad_out * states.real
        if grad_out is not None:
            torch.mul(grad_out, q, out=g.real[:, :T])
        # reverse time: g_t = conj(a_{t+1}) g_{t+1} + dh_t, with g_P entering through a 1
        b = torch.empty_like(gate)
        b[:, :-1] = gate[:, 1:].conj()
        b[:, -1] = 1.0
        enter = torch.zeros_like(state) if grad_final is None else grad_final
        _scan_chunks_(b.view(B, N, C, H), g.view(B, N, C, H), enter, 2, 1, reverse=True)
        g = g[:, :T]
        grad_u = g.real
        grad_gate = torch.empty_like(g)
        torch.mul(g[:, 1:], states[:, :-1].conj(), out=grad_gate[:, 1:])
        torch.mul(g[:, 0], state.conj(), out=grad_gate[:, 0])
        grad_state = gate[:, 0].conj() * g[:, 0]
        return grad_q, grad_u * v, grad_u * k, grad_gate, grad_state


def gate_loop_channels(
    q: Tensor, k: Tensor, v: Tensor, a: Gate, initial_state: Tensor | None = None
) -> Tuple[Tensor, Tensor]:
    """GateLoop with one channel per head (Dk = Dv = 1, GateLoop's default), in the model's
    (batch, time, channel) layout: one autograd node, no transposes.

    Equal to :func:`gate_loop_chunked` on ``q.transpose(1, 2)[..., None]`` (and likewise k, v,
    a) with ``initial_state[..., None, None]``; the scalar state per channel is stepped over
    chunks of 64 positions for all chunks at once (:func:`_scan_chunks_`).

    Args:
        q, k, v: (B, T, H) real.
        a: (B, T, H) complex with 0 < |a| <= 1, or a pair (log_magnitude, phase) of (B, T, H)
            real tensors.
        initial_state: (B, H) complex, or None for zeros.

    Returns:
        out (B, T, H) real, final_state (B, H) complex.
    """
    validate_channel_inputs(q, k, v, a, initial_state)
    with no_autocast(q.device.type):  # the documented compute dtype, also under autocast
        dt = compute_dtype(q, k, v)
        B, T, H = q.shape
        state = (torch.zeros(B, H, dtype=complex_dtype(dt), device=q.device) if initial_state is None
                 else initial_state.to(complex_dtype(dt)))
        if T == 0:
            return q.new_zeros(B, 0, H, dtype=output_dtype(q, k, v)), state
        qf, kf, vf, gate = q.to(dt), k.to(dt), v.to(dt), gate_complex(a, dt)
        if T <= _CHANNEL_STEPS and not torch.is_grad_enabled():  # generation: step directly
            outs = []
            for t in range(T):
                state = gate[:, t] * state + kf[:, t] * vf[:, t]
                outs.append(qf[:, t] * state.real)
            out = torch.stack(outs, dim=1)
        else:
            out, state = _ChannelScan.apply(qf, kf, vf, gate, state)
        return out.to(output_dtype(q, k, v)), state


# ---------------------------------------------------------------------------------------------
# Recurrent form
# ---------------------------------------------------------------------------------------------


def gate_loop_step(
    q: Tensor, k: Tensor, v: Tensor, a: Gate, state: Tensor | None
) -> Tuple[Tensor, Tensor]:
    """GateLoop one token at a time, for generation: constant cost per token.

    Usually T = 1; a few steps are looped.

    Args:
        q, k: (B, H, T, Dk) real.  v: (B, H, T, Dv) real.
        a: (B, H, T) complex, or a pair (log_magnitude, phase) of (B, H, T) real tensors.
        state: (B, H, Dk, Dv) complex, or None for zeros.

    Returns:
        out (B, H, T, Dv) real, new state (B, H, Dk, Dv) complex.
    """
    with no_autocast(q.device.type):  # the documented compute dtype, also under autocast
        return _gate_loop_step(q, k, v, a, state)


def _gate_loop_step(
    q: Tensor, k: Tensor, v: Tensor, a: Gate, state: Tensor | None
) -> Tuple[Tensor, Tensor]:
    B, H, T, Dk, Dv = validate_inputs(q, k, v, a, state, state_name="state")
    dt = compute_dtype(q, k, v)
    cdt = complex_dtype(dt)
    s = initial_state_or_zeros(state, B, H, Dk, Dv, dt, q.device)
    if T == 0:
        return v.new_zeros(B, H, 0, Dv).to(output_dtype(q, k, v)), s
    gate = gate_complex(a, dt)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    outs = []
    for t in range(T):
        kv = (kf[:, :, t, :, None] * vf[:, :, t, None, :]).to(cdt)
        s = gate[:, :, t, None, None] * s + kv
        outs.append(torch.matmul(qf[:, :, t, None, :], s.real))  # (B, H, 1, Dv)
    out = outs[0] if T == 1 else torch.cat(outs, dim=2)
    return out.to(output_dtype(q, k, v)), s


# ---------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------

_MODES = ("chunked", "sequential", "scan")


def _count_bad(t: Tensor) -> int:
    return int((~torch.isfinite(t.detach())).sum())


def _check_inputs_finite(q: Tensor, k: Tensor, v: Tensor, a: Gate, s0: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        bad = _count_bad(t)
        if bad:
            raise ValueError(
                f"gate_loop: input {name} has {bad} non-finite values (NaN/inf) out of "
                f"{t.numel()}; check the q/k/v projections and the layer input upstream"
            )
    if isinstance(a, Tensor):
        bad = _count_bad(a)
        if bad:
            raise ValueError(
                f"gate_loop: gates a have {bad} non-finite values (NaN/inf); check the gate "
                "projection (a = polar(sigmoid(|z|), angle(z))) and its input"
            )
        zero = int((a.detach().abs() == 0).sum())
        if zero:
            raise ValueError(
                f"gate_loop: gates a have {zero} values with |a| == 0; the log-space chunked form "
                "needs |a| > 0 (its log is -inf); check the gate magnitude (e.g. a sigmoid that "
                "underflowed) or pass the gate as (log_magnitude, phase)"
            )
    else:
        log_mag, phase = a
        for name, t, hint in (
            ("log_magnitude a[0]", log_mag, "-inf is |a| == 0: use logsigmoid, not log(sigmoid)"),
            ("phase a[1]", phase, "check the gate projection's angle"),
        ):
            bad = _count_bad(t)
            if bad:
                raise ValueError(
                    f"gate_loop: gate {name} has {bad} non-finite values (NaN/inf); {hint}"
                )
    if s0 is not None:
        bad = _count_bad(s0)
        if bad:
            raise ValueError(
                f"gate_loop: initial_state has {bad} non-finite values (NaN/inf) out of "
                f"{s0.numel()}; check the state carried over from the previous segment (reset it, "
                "or detach and check where it first went non-finite)"
            )


def _check_outputs_finite(out: Tensor, final_state: Tensor, a: Gate, mode: str) -> None:
    for name, t in (("output", out), ("final_state", final_state)):
        bad = _count_bad(t)
        if bad:
            if isinstance(a, Tensor):
                mag = a.detach().abs()
                lo, hi = float(mag.min()), float(mag.max())
            else:
                lm = a[0].detach()
                lo, hi = float(lm.min().exp()), float(lm.max().exp())
            raise ValueError(
                f"gate_loop (mode={mode!r}): {name} has {bad} non-finite values (NaN/inf) although "
                f"all inputs are finite; gate magnitudes span [{lo:.3g}, {hi:.3g}] - magnitudes "
                "above 1 grow the state exponentially, so check the gate parametrisation; "
                "otherwise check the magnitude of q/k/v and compare against mode='sequential'"
            )


def gate_loop(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Gate,
    initial_state: Tensor | None = None,
    *,
    mode: str = "chunked",
    chunk_size: int | None = None,
    check_finite: bool = False,
) -> Tuple[Tensor, Tensor]:
    """GateLoop by the selected form.

    Args:
        q, k: (B, H, T, Dk) real.  v: (B, H, T, Dv) real.
        a: (B, H, T) complex, or a pair (log_magnitude, phase) of (B, H, T) real tensors.
        initial_state: (B, H, Dk, Dv) complex, or None for zeros.
        mode: "chunked" (fast, training), "sequential" (loop reference) or "scan"
            (associative-scan reference).
        chunk_size: for mode="chunked"; None picks ``default_chunk_size(Dk, Dv)``.
        check_finite: reference-checking mode. Raise ``ValueError`` naming the first
            non-finite input (q/k/v, gates, initial state) or output, with what to check. Costs a
            device sync per check, so leave it off in normal training.

    Returns:
        out (B, H, T, Dv) real, final_state (B, H, Dk, Dv) complex.
    """
    if mode not in _MODES:
        raise ValueError(f"gate_loop: mode must be one of {_MODES}, got {mode!r}")
    validate_inputs(q, k, v, a, initial_state)
    if check_finite:
        _check_inputs_finite(q, k, v, a, initial_state)
    if mode == "chunked":
        out, final_state = gate_loop_chunked(q, k, v, a, initial_state, chunk_size=chunk_size)
    elif mode == "sequential":
        out, final_state = gate_loop_sequential_ref(q, k, v, a, initial_state)
    else:
        out, final_state = gate_loop_associative_scan_ref(q, k, v, a, initial_state)
    if check_finite:
        _check_outputs_finite(out, final_state, a, mode)
    return out, final_state
