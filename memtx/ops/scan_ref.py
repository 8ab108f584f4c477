"""Reference forms of the GateLoop recurrence, plus the input contract every form shares.

GateLoop (Katsch 2023) is a gated linear recurrence with complex, data-controlled transitions.
Per batch element and head, with a complex state ``S_t`` of shape (Dk, Dv)::

    S_t   = a_t * S_{t-1} + k_t^T v_t        (a_t: complex scalar, |a_t| in (0, 1))
    out_t = Re(q_t S_t) = q_t Re(S_t)        (q_t, k_t, v_t real row vectors)

The two forms here are slow but easy to check by eye; the fast forms in ``memtx.ops.scan`` are
tested against them.

* ``gate_loop_sequential_ref``: a plain loop over time.
* ``gate_loop_associative_scan_ref``: a log-depth, work-efficient associative scan over time,
  as in the GateLoop paper's pseudocode, extended with an initial state.

Shapes (the same layout in every form of this package)::

    B  batch            H  heads           T  time (sequence length)
    Dk key/query dim    Dv value dim

    q               (B, H, T, Dk)   real
    k               (B, H, T, Dk)   real
    v               (B, H, T, Dv)   real
    a               (B, H, T)       complex, |a| in (0, 1)
                    or a pair (log_magnitude, phase), each (B, H, T) real,
                    meaning a = exp(log_magnitude) * exp(i * phase)
    initial_state   (B, H, Dk, Dv)  complex, or None for zeros
    out             (B, H, T, Dv)   real
    final_state     (B, H, Dk, Dv)  complex

The shared helpers (``validate_inputs``, ``gate_log_parts``, ``gate_complex``, dtype policy)
live here, not in ``scan.py``, because the reference owns the contract: the fast forms import
them, so every form checks and interprets its inputs identically.
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "Gate",
    "gate_loop_sequential_ref",
    "gate_loop_associative_scan_ref",
    "associative_scan",
    "validate_inputs",
    "gate_log_parts",
    "gate_complex",
]

# A gate is either a complex tensor a, or (log|a|, angle(a)) as two real tensors. The pair form
# lets a model pass logsigmoid(...) directly, which keeps precision for |a| close to 1 where
# log(sigmoid(x)) would round to 0.
Gate = Union[Tensor, Tuple[Tensor, Tensor]]


# ---------------------------------------------------------------------------------------------
# Shared contract: validation and dtype policy
# ---------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def validate_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Gate,
    initial_state: Tensor | None,
    *,
    state_name: str = "initial_state",
) -> Tuple[int, int, int, int, int]:
    """Check shapes and dtypes of a GateLoop call; return (B, H, T, Dk, Dv).

    Raises ``ValueError`` with the expected and the actual shape when something does not match.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have shape (B, H, T, D) (4 dims), got {t.dim()} dims with shape "
                f"{_shape(t)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a real floating-point tensor, got dtype {t.dtype}")
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    if tuple(k.shape) != (B, H, T, Dk):
        raise ValueError(
            f"k must have the same shape as q (B, H, T, Dk) = {_shape(q)}, got {_shape(k)}"
        )
    if tuple(v.shape[:3]) != (B, H, T):
        raise ValueError(
            f"v must have shape (B, H, T, Dv) with (B, H, T) = ({B}, {H}, {T}) as in q, "
            f"got {_shape(v)}"
        )

    gate_parts: Sequence[Tuple[str, Tensor]]
    if isinstance(a, Tensor):
        if not a.is_complex():
            raise ValueError(
                f"gate a must be a complex tensor (or a pair (log_magnitude, phase) of real "
                f"tensors), got dtype {a.dtype}"
            )
        gate_parts = (("a", a),)
    elif isinstance(a, (tuple, list)) and len(a) == 2:
        gate_parts = (("a[0] (log_magnitude)", a[0]), ("a[1] (phase)", a[1]))
        for name, t in gate_parts:
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError(f"gate {name} must be a real floating-point tensor")
    else:
        raise ValueError(
            "gate a must be a complex tensor of shape (B, H, T) or a pair "
            f"(log_magnitude, phase) of real (B, H, T) tensors, got {type(a).__name__}"
        )
    for name, t in gate_parts:
        if tuple(t.shape) != (B, H, T):
            raise ValueError(
                f"gate {name} must have shape (B, H, T) = ({B}, {H}, {T}) matching q, "
                f"got {_shape(t)}"
            )

    if initial_state is not None:
        if not isinstance(initial_state, Tensor):
            raise ValueError(
                f"{state_name} must be a complex tensor or None, got {type(initial_state).__name__}"
            )
        if tuple(initial_state.shape) != (B, H, Dk, Dv):
            raise ValueError(
                f"{state_name} has the wrong shape: expected (B, H, Dk, Dv) = "
                f"({B}, {H}, {Dk}, {Dv}), got {_shape(initial_state)}"
            )
        if not (initial_state.is_complex() or initial_state.is_floating_point()):
            raise ValueError(f"{state_name} must be complex, got dtype {initial_state.dtype}")
    return B, H, T, Dk, Dv


def validate_channel_inputs(
    q: Tensor, k: Tensor, v: Tensor, a: Gate, state: Tensor | None
) -> None:
    """Check shapes and dtypes of a one-channel-per-head call (``gate_loop_channels``): q, k, v
    (B, T, H) real, a (B, T, H) complex or a (log_magnitude, phase) pair, state (B, H)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3 or not t.is_floating_point():
            got = f"shape {_shape(t)}, dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a real (B, T, H) tensor, got {got}")
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {_shape(q)}, got {_shape(t)}")
    pair = isinstance(a, (tuple, list)) and len(a) == 2
    parts = (a,) if isinstance(a, Tensor) else tuple(a) if pair else ()
    if not parts or any(not isinstance(t, Tensor) or t.shape != q.shape for t in parts):
        raise ValueError(
            f"gate a must be a complex tensor of q's shape (B, T, H) = {_shape(q)} or a pair "
            "(log_magnitude, phase) of real tensors of that shape"
        )
    if pair and not all(t.is_floating_point() for t in parts):
        raise ValueError("gate (log_magnitude, phase) must be real floating-point tensors")
    if not pair and not a.is_complex():
        raise ValueError(f"gate a must be complex, got dtype {a.dtype}")
    B, _, H = q.shape
    if state is not None and tuple(state.shape) != (B, H):
        raise ValueError(
            f"initial_state must have shape (B, H) = ({B}, {H}), got {_shape(state)}"
        )


def compute_dtype(q: Tensor, k: Tensor, v: Tensor) -> torch.dtype:
    """Real dtype the recurrence runs in: the inputs' promoted dtype, at least float32.

    Half-precision decays lose the long-range products entirely, so they are never used.
    """
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return torch.promote_types(dt, torch.float32)


def complex_dtype(real: torch.dtype) -> torch.dtype:
    return torch.complex128 if real == torch.float64 else torch.complex64


def output_dtype(q: Tensor, k: Tensor, v: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


def gate_log_parts(a: Gate, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Return (log|a|, angle(a)) as real tensors of ``dtype``."""
    if isinstance(a, Tensor):
        a = a.to(complex_dtype(dtype))
        return torch.log(torch.abs(a)), torch.angle(a)
    log_mag, phase = a
    return log_mag.to(dtype), phase.to(dtype)


def gate_complex(a: Gate, dtype: torch.dtype) -> Tensor:
    """Return the gate as a complex tensor of the complex counterpart of ``dtype``."""
    if isinstance(a, Tensor):
        return a.to(complex_dtype(dtype))
    log_mag, phase = a
    return torch.polar(torch.exp(log_mag.to(dtype)), phase.to(dtype))


def initial_state_or_zeros(
    initial_state: Tensor | None, B: int, H: int, Dk: int, Dv: int, dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    cdt = complex_dtype(dtype)
    if initial_state is None:
        return torch.zeros(B, H, Dk, Dv, dtype=cdt, device=device)
    return initial_state.to(cdt)


# ---------------------------------------------------------------------------------------------
# Reference 1: plain loop over time
# ---------------------------------------------------------------------------------------------


def gate_loop_sequential_ref(
    q: Tensor, k: Tensor, v: Tensor, a: Gate, initial_state: Tensor | None = None
) -> Tuple[Tensor, Tensor]:
    """GateLoop by a plain loop over time. Slow; obviously correct.

    Args:
        q, k: (B, H, T, Dk) real.  v: (B, H, T, Dv) real.
        a: (B, H, T) complex, or a pair (log_magnitude, phase) of (B, H, T) real tensors.
        initial_state: (B, H, Dk, Dv) complex, or None for zeros.

    Returns:
        out (B, H, T, Dv) real, final_state (B, H, Dk, Dv) complex.
    """
    B, H, T, Dk, Dv = validate_inputs(q, k, v, a, initial_state)
    dt = compute_dtype(q, k, v)
    cdt = complex_dtype(dt)
    gate = gate_complex(a, dt)
    state = initial_state_or_zeros(initial_state, B, H, Dk, Dv, dt, q.device)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)

    outs = []
    for t in range(T):
        kv = (kf[:, :, t, :, None] * vf[:, :, t, None, :]).to(cdt)
        state = gate[:, :, t, None, None] * state + kv
        outs.append(torch.einsum("bhd,bhde->bhe", qf[:, :, t], state.real))
    out = torch.stack(outs, dim=2) if outs else vf.new_zeros(B, H, 0, Dv)
    return out.to(output_dtype(q, k, v)), state


# ---------------------------------------------------------------------------------------------
# Reference 2: associative scan
# ---------------------------------------------------------------------------------------------


def associative_scan(
    combine: Callable[[Sequence[Tensor], Sequence[Tensor]], Sequence[Tensor]],
    elems: Sequence[Tensor],
) -> list[Tensor]:
    """Inclusive scan of ``elems`` along dim 0 with an associative ``combine(earlier, later)``.

    Work-efficient odd/even recursion (O(n) combines, O(log n) depth): combine neighbours
    pairwise, scan the half-length sequence, then fill in the even positions from it.
    """
    n = elems[0].shape[0]
    if any(e.shape[0] != n for e in elems):
        raise ValueError(
            "associative_scan: all elems need the same length along dim 0, got "
            f"{[tuple(e.shape) for e in elems]}"
        )
    if n < 2:
        return list(elems)

    half = n // 2
    # Pair (0,1), (2,3), ...: element i of `pairs` is the total of positions 2i..2i+1.
    pairs = combine([e[0 : 2 * half : 2] for e in elems], [e[1 : 2 * half : 2] for e in elems])
    # odd[i] = prefix total up to position 2i+1.
    odd = associative_scan(combine, pairs)
    # Even positions 2, 4, ...: prefix up to the preceding odd position, then the element itself.
    n_even_rest = (n - 1) // 2
    even_rest = combine([o[:n_even_rest] for o in odd], [e[2::2] for e in elems])
    even = [torch.cat([e[:1], r], dim=0) for e, r in zip(elems, even_rest)]

    result = []
    for ev, od in zip(even, odd):
        # Interleave even[0], odd[0], even[1], odd[1], ...; an odd n leaves one trailing even.
        woven = torch.stack([ev[:half], od], dim=1).flatten(0, 1)
        if n % 2:
            woven = torch.cat([woven, ev[half:]], dim=0)
        result.append(woven)
    return result


def _gate_loop_combine(
    earlier: Sequence[Tensor], later: Sequence[Tensor]
) -> Tuple[Tensor, Tensor]:
    # Composing S -> a_i S + x_i, then S -> a_j S + x_j gives S -> a_j a_i S + (a_j x_i + x_j).
    a_i, x_i = earlier
    a_j, x_j = later
    return a_j * a_i, a_j * x_i + x_j


def gate_loop_associative_scan_ref(
    q: Tensor, k: Tensor, v: Tensor, a: Gate, initial_state: Tensor | None = None
) -> Tuple[Tensor, Tensor]:
    """GateLoop by a log-depth associative scan over time (the paper's formulation).

    The initial state is folded into the first step's input (x_0 = a_0 S_init + k_0^T v_0), which
    leaves the scan itself unchanged. Materialises the full (B, H, T, Dk, Dv) complex state
    sequence, so it is memory-hungry; kept as a parity reference.

    Args:
        q, k: (B, H, T, Dk) real.  v: (B, H, T, Dv) real.
        a: (B, H, T) complex, or a pair (log_magnitude, phase) of (B, H, T) real tensors.
        initial_state: (B, H, Dk, Dv) complex, or None for zeros.

    Returns:
        out (B, H, T, Dv) real, final_state (B, H, Dk, Dv) complex.
    """
    B, H, T, Dk, Dv = validate_inputs(q, k, v, a, initial_state)
    dt = compute_dtype(q, k, v)
    cdt = complex_dtype(dt)
    if T == 0:
        state = initial_state_or_zeros(initial_state, B, H, Dk, Dv, dt, q.device)
        return v.new_zeros(B, H, 0, Dv).to(output_dtype(q, k, v)), state
    gate = gate_complex(a, dt)
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)

    x = (kf[..., :, None] * vf[..., None, :]).to(cdt)  # (B, H, T, Dk, Dv)
    if initial_state is not None:
        s0 = initial_state.to(cdt)
        x = torch.cat([(gate[:, :, 0, None, None] * s0 + x[:, :, 0])[:, :, None], x[:, :, 1:]], 2)

    # Time to dim 0 so the scan can slice it directly.
    gate_t = gate.permute(2, 0, 1)[..., None, None]  # (T, B, H, 1, 1)
    x_t = x.permute(2, 0, 1, 3, 4)  # (T, B, H, Dk, Dv)
    _, states = associative_scan(_gate_loop_combine, [gate_t, x_t])
    states = states.permute(1, 2, 0, 3, 4)  # (B, H, T, Dk, Dv)

    out = torch.einsum("bhtd,bhtde->bhte", qf, states.real)
    return out.to(output_dtype(q, k, v)), states[:, :, -1]
