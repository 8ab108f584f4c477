"""Parity tests for the GateLoop forms in memtx.ops.scan and memtx.ops.scan_ref.

Every form must agree with the plain sequential loop on outputs, final state, and gradients with
respect to q, k, v, the real gate parameters (magnitude logits and phase) and the initial state.
Strict comparisons run in float64 (forms differ by rounding only, ~1e-15), so the 1e-9
tolerance catches any real error; float32 checks use 1e-4.

Layout: q, k (B, H, T, Dk); v (B, H, T, Dv); gate (B, H, T) complex; state (B, H, Dk, Dv) complex.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from memtx.ops.scan import (
    gate_loop,
    gate_loop_channels,
    gate_loop_chunked,
    gate_loop_step,
)
from memtx.ops.scan_ref import gate_loop_associative_scan_ref, gate_loop_sequential_ref


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # These tensors are tiny: a second intra-op thread only adds wake-up latency per op, which
    # on a busy CPU made this file 3x slower. Restored afterwards for the other test modules.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


F64_TOL = 1e-9
F32_TOL = 1e-4

Form = Callable[..., Tuple[Tensor, Tensor]]


def rel_rms(a: Tensor, b: Tensor) -> float:
    """rms(a - b) / rms(b); complex tensors compare as complex."""
    a, b = a.detach(), b.detach()
    num = (a - b).abs().pow(2).mean().sqrt()
    den = b.abs().pow(2).mean().sqrt()
    return float(num / den.clamp_min(torch.finfo(den.dtype).tiny))


@dataclass
class Leaves:
    """Real leaf parameters the inputs are built from, so gradients are real and comparable."""

    q: Tensor
    k: Tensor
    v: Tensor
    mag_logit: Tensor  # (B, H, T): |a| = sigmoid(mag_logit)
    phase: Tensor  # (B, H, T): angle(a)
    s0_re: Tensor  # (B, H, Dk, Dv)
    s0_im: Tensor

    def named(self) -> Dict[str, Tensor]:
        return dict(vars(self))

    def gate(self, as_pair: bool = False):
        if as_pair:
            return F.logsigmoid(self.mag_logit), self.phase
        return torch.polar(torch.sigmoid(self.mag_logit), self.phase)

    def state(self) -> Tensor:
        return torch.complex(self.s0_re, self.s0_im)


def make_leaves(
    B: int,
    H: int,
    T: int,
    D: int,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    mag_logit: Tensor | None = None,
) -> Leaves:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    if mag_logit is None:
        # |a| roughly in (0.5, 0.99): the model's range (sigmoid of a non-negative number).
        mag_logit = torch.rand(B, H, T, generator=g, dtype=dtype) * 4.0
    phase = (torch.rand(B, H, T, generator=g, dtype=dtype) * 2 - 1) * torch.pi
    return Leaves(
        q=rnd(B, H, T, D),
        k=rnd(B, H, T, D, scale=D**-0.5),
        v=rnd(B, H, T, D),
        mag_logit=mag_logit.to(dtype).clone().requires_grad_(),
        phase=phase.requires_grad_(),
        s0_re=rnd(B, H, D, D),
        s0_im=rnd(B, H, D, D),
    )


def run_with_grads(form: Form, leaves: Leaves, *, as_pair: bool = False, seed: int = 1):
    """Run a form, backprop a fixed random projection of (out, final_state); return all."""
    out, final = form(leaves.q, leaves.k, leaves.v, leaves.gate(as_pair), leaves.state())
    g = torch.Generator().manual_seed(seed)
    # Drawn in float64 whatever the run's dtype, so fp32 and fp64 runs get the same loss.
    w_out, w_re, w_im = (
        torch.randn(shape, generator=g, dtype=torch.float64).to(out.dtype)
        for shape in (out.shape, final.shape, final.shape)
    )
    loss = (out * w_out).sum() + (final.real * w_re).sum() + (final.imag * w_im).sum()
    params = leaves.named()
    grads = torch.autograd.grad(loss, list(params.values()))
    return out.detach(), final.detach(), dict(zip(params, grads))


def step_by_token(q, k, v, a, state):
    """The one-step form applied token by token, carrying the state."""
    outs = []
    for t in range(q.shape[2]):
        sl = slice(t, t + 1)
        a_t = a[:, :, sl] if isinstance(a, Tensor) else (a[0][:, :, sl], a[1][:, :, sl])
        o, state = gate_loop_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], a_t, state)
        outs.append(o)
    return torch.cat(outs, dim=2), state


def assert_close(got, want, tol: float, what: str) -> None:
    out_g, fin_g, grads_g = got
    out_w, fin_w, grads_w = want
    assert out_g.shape == out_w.shape, f"{what}: out shape {out_g.shape} vs {out_w.shape}"
    assert fin_g.shape == fin_w.shape, f"{what}: state shape {fin_g.shape} vs {fin_w.shape}"
    errs = {"out": rel_rms(out_g, out_w), "final_state": rel_rms(fin_g, fin_w)}
    for name in grads_w:
        errs[f"grad {name}"] = rel_rms(grads_g[name], grads_w[name])
    bad = {k: e for k, e in errs.items() if not e < tol}
    assert not bad, f"{what}: rel-RMS above {tol:g}: {bad}"


FORMS: Dict[str, Form] = {
    "scan": gate_loop_associative_scan_ref,
    "chunked-matmul-c16": partial(gate_loop_chunked, chunk_size=16, intra="matmul"),
    "chunked-recurrent-c16": partial(gate_loop_chunked, chunk_size=16, intra="recurrent"),
    "chunked-auto": gate_loop_chunked,
    "step": step_by_token,
}

SHAPES = [
    pytest.param(2, 3, 37, 1, id="B2-H3-T37-D1"),
    pytest.param(2, 2, 37, 32, id="B2-H2-T37-D32"),
    pytest.param(1, 2, 1, 1, id="B1-H2-T1-D1"),
    pytest.param(1, 2, 1, 32, id="B1-H2-T1-D32"),
    pytest.param(2, 2, 48, 4, id="B2-H2-T48-D4"),
]


@pytest.mark.parametrize("B,H,T,D", SHAPES)
@pytest.mark.parametrize("form_name", list(FORMS))
def test_forms_match_sequential_f64(form_name: str, B: int, H: int, T: int, D: int) -> None:
    leaves = make_leaves(B, H, T, D)
    want = run_with_grads(gate_loop_sequential_ref, leaves)
    got = run_with_grads(FORMS[form_name], leaves)
    assert_close(got, want, F64_TOL, form_name)


@pytest.mark.parametrize("intra", ["matmul", "recurrent"])
@pytest.mark.parametrize(
    "B,H,T,D",
    [pytest.param(2, 4, 70, 1, id="B2-H4-T70-D1"), pytest.param(2, 2, 70, 32, id="B2-H2-T70-D32")],
)
def test_chunked_matches_sequential_f32(intra: str, B: int, H: int, T: int, D: int) -> None:
    leaves = make_leaves(B, H, T, D, dtype=torch.float32)
    want = run_with_grads(gate_loop_sequential_ref, leaves)
    got = run_with_grads(partial(gate_loop_chunked, chunk_size=16, intra=intra), leaves)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.complex64
    assert_close(got, want, F32_TOL, f"chunked-{intra} fp32")


@pytest.mark.parametrize(
    "form_name", ["scan", "chunked-matmul-c16", "chunked-recurrent-c16", "step"]
)
def test_gate_as_log_magnitude_phase_pair(form_name: str) -> None:
    leaves = make_leaves(2, 2, 29, 3)
    want = run_with_grads(gate_loop_sequential_ref, leaves)
    got = run_with_grads(FORMS[form_name], leaves, as_pair=True)
    assert_close(got, want, F64_TOL, f"{form_name} with (log_magnitude, phase) gate")


@pytest.mark.parametrize("intra", ["matmul", "recurrent"])
def test_long_sequence_4096(intra: str) -> None:
    # |a| close to 1 so information crosses many chunks; the scan is the O(log T)-depth reference.
    T = 4096
    g = torch.Generator().manual_seed(3)
    mag_logit = 6.0 + 4.0 * torch.rand(1, 2, T, generator=g, dtype=torch.float64)
    leaves = make_leaves(1, 2, T, 4, mag_logit=mag_logit)
    want = run_with_grads(gate_loop_associative_scan_ref, leaves)
    got = run_with_grads(partial(gate_loop_chunked, chunk_size=64, intra=intra), leaves)
    assert_close(got, want, F64_TOL, f"chunked-{intra} T=4096")


def test_matmul_form_keeps_no_chunk_square_tensor_for_backward() -> None:
    # the (B, H, N, C, C) segment sums, decays and scores are recomputed in backward
    B, H, N, C, D = 1, 2, 3, 16, 8
    leaves = make_leaves(B, H, N * C, D)
    shapes = []

    def pack(t: Tensor) -> Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, final = gate_loop_chunked(leaves.q, leaves.k, leaves.v, leaves.gate(as_pair=True),
                                       leaves.state(), chunk_size=C, intra="matmul")
    assert shapes and (B, H, N, C, C) not in shapes, shapes
    want = run_with_grads(gate_loop_sequential_ref, leaves, as_pair=True)
    got = run_with_grads(partial(gate_loop_chunked, chunk_size=C, intra="matmul"), leaves,
                         as_pair=True)
    assert_close(got, want, F64_TOL, "matmul form with its intra-chunk term recomputed")


def channels(q, k, v, a, state):
    """gate_loop_channels in the (B, H, T, 1) layout of the other forms (Dk = Dv = 1)."""
    def to_bth(t: Tensor) -> Tensor:
        return t.transpose(1, 2) if t.dim() == 3 else t[..., 0].transpose(1, 2)

    gate = to_bth(a) if isinstance(a, Tensor) else tuple(to_bth(p) for p in a)
    out, final = gate_loop_channels(to_bth(q), to_bth(k), to_bth(v), gate, state[..., 0, 0])
    return out.transpose(1, 2)[..., None], final[..., None, None]


@pytest.mark.parametrize("T", [1, 37, 64, 127, 130, 191])  # padded by 63, 1, 62 and 1
@pytest.mark.parametrize("as_pair", [False, True])
def test_channels_match_sequential_f64(T: int, as_pair: bool) -> None:
    leaves = make_leaves(2, 3, T, 1, seed=T)
    want = run_with_grads(gate_loop_sequential_ref, leaves, as_pair=as_pair)
    assert_close(run_with_grads(channels, leaves, as_pair=as_pair), want, F64_TOL, f"channels T={T}")


@pytest.mark.parametrize("T", [1, 3, 4, 5])
def test_channels_without_autograd_match(T: int) -> None:
    # generation (no autograd, a few tokens) steps the recurrence directly
    leaves = make_leaves(2, 3, T, 1, seed=T)
    with torch.no_grad():
        got = channels(leaves.q, leaves.k, leaves.v, leaves.gate(), leaves.state())
        want = gate_loop_sequential_ref(leaves.q, leaves.k, leaves.v, leaves.gate(), leaves.state())
    for a, b in zip(got, want):
        assert rel_rms(a, b) < F64_TOL


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("T", [3, 70])  # the stepped and the chunked path without autograd
def test_channels_dtypes(T: int, grad: bool) -> None:
    leaves = _to_dtype(make_leaves(2, 3, T, 1, seed=5), torch.float32)
    q, k, v = (t[..., 0].transpose(1, 2) for t in (leaves.q, leaves.k, leaves.v))
    a = leaves.gate().transpose(1, 2)
    with torch.set_grad_enabled(grad):
        # bfloat16 inputs compute in float32 and come back in bfloat16
        out, final = gate_loop_channels(q.bfloat16(), k.bfloat16(), v.bfloat16(), a)
        want, want_final = gate_loop_channels(q.bfloat16().float(), k.bfloat16().float(),
                                              v.bfloat16().float(), a)
        assert out.dtype == torch.bfloat16 and final.dtype == torch.complex64
        assert torch.allclose(out.float(), want, rtol=1e-2, atol=1e-2)
        assert torch.equal(final, want_final)
        # a complex128 state with float32 inputs: float32 compute, complex64 state out
        out, final = gate_loop_channels(q, k, v, a, leaves.state()[..., 0, 0].to(torch.complex128))
        assert out.dtype == torch.float32 and final.dtype == torch.complex64
    if grad:  # with autograd the recurrence is one node
        assert type(out.grad_fn).__name__ == "_ChannelScanBackward"


def test_channels_long_sequence_and_float32() -> None:
    T = 4096
    g = torch.Generator().manual_seed(3)
    mag_logit = 6.0 + 4.0 * torch.rand(2, 3, T, generator=g, dtype=torch.float64)
    leaves = make_leaves(2, 3, T, 1, mag_logit=mag_logit)
    want = run_with_grads(gate_loop_associative_scan_ref, leaves)
    assert_close(run_with_grads(channels, leaves), want, F64_TOL, "channels T=4096")
    got32 = run_with_grads(channels, _to_dtype(leaves, torch.float32), as_pair=True)
    assert got32[0].dtype == torch.float32 and got32[1].dtype == torch.complex64
    got32 = (got32[0].double(), got32[1].to(torch.complex128),
             {n: t.double() for n, t in got32[2].items()})
    assert_close(got32, want, F32_TOL, "channels T=4096 f32 vs f64")


def test_channels_gradient_of_final_state_alone() -> None:
    # only the state is used downstream (the output unused): the node gets no output gradient
    leaves = make_leaves(2, 3, 70, 1)
    params = list(leaves.named().values())

    def grads(form: Form) -> list[Tensor]:
        final = form(leaves.q, leaves.k, leaves.v, leaves.gate(), leaves.state())[1]
        got = torch.autograd.grad(final.abs().sum(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(got, params)]

    for name, g, w in zip(leaves.named(), grads(channels), grads(gate_loop_sequential_ref)):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-12), name
    assert grads(channels)[0].abs().max() == 0  # q reaches only the output


def test_channels_errors_are_clear() -> None:
    q = torch.randn(2, 5, 3)
    a = torch.polar(torch.full((2, 5, 3), 0.9), torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match=r"k must have the shape of q \(2, 5, 3\), got \(2, 5, 4\)"):
        gate_loop_channels(q, torch.randn(2, 5, 4), q, a)
    with pytest.raises(ValueError, match=r"q must be a real \(B, T, H\) tensor"):
        gate_loop_channels(q[..., None], q, q, a)
    with pytest.raises(ValueError, match=r"gate a must be complex"):
        gate_loop_channels(q, q, q, a.real)
    with pytest.raises(ValueError, match=r"gate a must be a complex tensor of q's shape"):
        gate_loop_channels(q, q, q, a[:, :4])
    with pytest.raises(ValueError, match=r"gate a must be a complex tensor of q's shape"):
        gate_loop_channels(q, q, q, (a.real,))
    with pytest.raises(ValueError, match=r"must be real floating-point"):
        gate_loop_channels(q, q, q, (a, a))
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B, H\) = \(2, 3\)"):
        gate_loop_channels(q, q, q, a, torch.zeros(2, 3, 1, 1, dtype=torch.complex64))


def _to_dtype(leaves: Leaves, dtype: torch.dtype) -> Leaves:
    return Leaves(**{n: t.detach().to(dtype).requires_grad_() for n, t in leaves.named().items()})


@pytest.mark.parametrize("intra", ["matmul", "recurrent"])
@pytest.mark.parametrize("mag", [1e-6, 1 - 1e-6, "mixed"])
def test_extreme_gate_magnitudes(mag, intra: str) -> None:
    B, H, T, D = 1, 2, 150, 2  # more than two chunks of 64
    g = torch.Generator().manual_seed(4)
    if mag == "mixed":
        pick = torch.rand(B, H, T, generator=g) < 0.5
        mags = torch.where(pick, 1e-6, 1 - 1e-6).to(torch.float64)
    else:
        mags = torch.full((B, H, T), float(mag), dtype=torch.float64)
    leaves = make_leaves(B, H, T, D, mag_logit=torch.log(mags) - torch.log1p(-mags))
    form = partial(gate_loop_chunked, chunk_size=64, intra=intra)
    truth = run_with_grads(gate_loop_sequential_ref, leaves)

    def assert_finite(res, what):
        for name, t in [("out", res[0]), ("final_state", res[1]), *res[2].items()]:
            assert torch.isfinite(t).all(), f"{what}: {name} not finite for |a|={mag}"

    got = run_with_grads(form, leaves)
    assert_finite(got, "f64")
    assert_close(got, truth, F64_TOL, f"|a|={mag} {intra} f64")

    # fp32 with a complex gate: must stay finite. Its accuracy near |a| = 1 is limited by the
    # gate itself (sigmoid(13.8) in fp32 is 1 - 1e-6 to ~6%), so accuracy is checked with the
    # gate given as (logsigmoid, phase), which represents |a| near 1 exactly.
    leaves32 = _to_dtype(leaves, torch.float32)
    assert_finite(run_with_grads(form, leaves32), "f32 complex gate")
    got32 = run_with_grads(form, leaves32, as_pair=True)
    assert_finite(got32, "f32 pair gate")
    got32 = (got32[0].double(), got32[1].to(torch.complex128),
             {n: t.double() for n, t in got32[2].items()})
    assert_close(got32, truth, F32_TOL, f"|a|={mag} {intra} f32 vs f64 truth")


@pytest.mark.parametrize("intra", ["matmul", "recurrent"])
@pytest.mark.parametrize("D", [1, 32])
def test_segments_equal_one_call(intra: str, D: int) -> None:
    # T = 2N in one call == N, then N with the final state carried (N not a chunk multiple).
    N = 37
    leaves = make_leaves(2, 2, 2 * N, D)
    fn = partial(gate_loop_chunked, chunk_size=16, intra=intra)

    def two_segments(q, k, v, a, s0):
        o1, s1 = fn(q[:, :, :N], k[:, :, :N], v[:, :, :N], a[:, :, :N], s0)
        o2, s2 = fn(q[:, :, N:], k[:, :, N:], v[:, :, N:], a[:, :, N:], s1)
        return torch.cat([o1, o2], dim=2), s2

    assert_close(run_with_grads(two_segments, leaves), run_with_grads(fn, leaves), F64_TOL, intra)


@pytest.mark.parametrize("D", [1, 32])
def test_step_by_token_equals_chunked_f32(D: int) -> None:
    leaves = make_leaves(2, 2, 40, D, dtype=torch.float32)
    want = run_with_grads(partial(gate_loop_chunked, chunk_size=16), leaves)
    assert_close(run_with_grads(step_by_token, leaves), want, F32_TOL, "step vs chunked")


def test_no_initial_state_means_zeros() -> None:
    leaves = make_leaves(2, 2, 21, 3)
    q, k, v, a = leaves.q, leaves.k, leaves.v, leaves.gate()
    zeros = torch.zeros(2, 2, 3, 3, dtype=torch.complex128)
    for form in (gate_loop_sequential_ref, gate_loop_associative_scan_ref, gate_loop_chunked):
        o1, s1 = form(q, k, v, a)
        o2, s2 = form(q, k, v, a, zeros)
        assert rel_rms(o1, o2) < F64_TOL and rel_rms(s1, s2) < F64_TOL, form.__name__
    o1, s1 = gate_loop_step(q, k, v, a, None)
    o2, _ = gate_loop_sequential_ref(q, k, v, a)
    assert rel_rms(o1, o2) < F64_TOL


@pytest.mark.parametrize("mode", ["chunked", "sequential", "scan"])
def test_dispatcher_modes_agree(mode: str) -> None:
    leaves = make_leaves(1, 3, 25, 2)
    want = run_with_grads(gate_loop_sequential_ref, leaves)
    got = run_with_grads(partial(gate_loop, mode=mode, check_finite=True), leaves)
    assert_close(got, want, F64_TOL, mode)


def test_shapes_and_dtypes_follow_layout() -> None:
    B, H, T, Dk, Dv = 2, 3, 10, 4, 5
    q, k = torch.randn(B, H, T, Dk), torch.randn(B, H, T, Dk)
    v = torch.randn(B, H, T, Dv)
    a = torch.polar(torch.full((B, H, T), 0.9), torch.zeros(B, H, T))
    for mode in ("chunked", "sequential", "scan"):
        out, state = gate_loop(q, k, v, a, mode=mode)
        assert out.shape == (B, H, T, Dv) and out.dtype == torch.float32
        assert state.shape == (B, H, Dk, Dv) and state.dtype == torch.complex64
    out, state = gate_loop_chunked(q[:, :, :0], k[:, :, :0], v[:, :, :0], a[:, :, :0])
    assert out.shape == (B, H, 0, Dv) and not state.abs().any()


# --- errors -------------------------------------------------------------------------------------


def _inputs(B=2, H=3, T=8, Dk=4, Dv=4):
    q, k, v = torch.randn(B, H, T, Dk), torch.randn(B, H, T, Dk), torch.randn(B, H, T, Dv)
    a = torch.polar(torch.full((B, H, T), 0.9), torch.ones(B, H, T))
    return q, k, v, a


@pytest.mark.parametrize(
    "change,match",
    [
        pytest.param(lambda q, k, v, a: (q, k[:, :2], v, a), "k must have the same", id="k-H"),
        pytest.param(lambda q, k, v, a: (q, k, v[:, :, :5], a), "v must have shape", id="v-T"),
        pytest.param(lambda q, k, v, a: (q, k, v, a[:1]), "gate a must have shape", id="gate-B"),
        pytest.param(lambda q, k, v, a: (q, k, v, a.real), "complex", id="gate-real"),
        pytest.param(lambda q, k, v, a: (q[0], k, v, a), r"shape \(B, H, T, D\)", id="q-3d"),
    ],
)
def test_shape_errors_are_clear(change, match: str) -> None:
    q, k, v, a = change(*_inputs())
    for form in (gate_loop_chunked, gate_loop_sequential_ref, gate_loop_associative_scan_ref):
        with pytest.raises(ValueError, match=match):
            form(q, k, v, a)


def test_wrong_state_shape_says_expected_and_got() -> None:
    q, k, v, a = _inputs()
    bad = torch.zeros(2, 3, 4, 5, dtype=torch.complex64)
    expected = r"expected \(B, H, Dk, Dv\) = \(2, 3, 4, 4\), got \(2, 3, 4, 5\)"
    with pytest.raises(ValueError, match=expected):
        gate_loop_chunked(q, k, v, a, bad)
    with pytest.raises(ValueError, match="state has the wrong shape"):
        gate_loop_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], a[:, :, :1], bad)


def test_bad_options_rejected() -> None:
    q, k, v, a = _inputs()
    with pytest.raises(ValueError, match="mode must be one of"):
        gate_loop(q, k, v, a, mode="fast")
    with pytest.raises(ValueError, match="intra must be"):
        gate_loop_chunked(q, k, v, a, intra="fft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        gate_loop_chunked(q, k, v, a, chunk_size=0)


def test_check_finite_names_the_culprit() -> None:
    q, k, v, a = _inputs()
    s0 = torch.zeros(2, 3, 4, 4, dtype=torch.complex64)

    bad_gate = a.clone()
    bad_gate[0, 0, 3] = complex("nan")
    with pytest.raises(ValueError, match="gates a have 1 non-finite"):
        gate_loop(q, k, v, bad_gate, check_finite=True)

    zero_gate = a.clone()
    zero_gate[1, 2, 0] = 0
    with pytest.raises(ValueError, match=r"\|a\| == 0"):
        gate_loop(q, k, v, zero_gate, check_finite=True)

    bad_state = s0.clone()
    bad_state[0, 1, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="initial_state has 1 non-finite"):
        gate_loop(q, k, v, a, bad_state, check_finite=True)

    pair = (torch.full((2, 3, 8), -float("inf")), torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="log_magnitude"):
        gate_loop(q, k, v, pair, check_finite=True)

    # Finite inputs, exploding gates (|a| = 1e4 over 20 steps overflows fp32).
    big = torch.polar(torch.full((2, 3, 20), 1e4), torch.zeros(2, 3, 20))
    q2, k2, v2 = (torch.ones(2, 3, 20, 4) for _ in range(3))
    for mode in ("chunked", "sequential"):
        with pytest.raises(ValueError, match=r"output has \d+ non-finite.*magnitudes span"):
            gate_loop(q2, k2, v2, big, mode=mode, check_finite=True)
    # Off by default: no check, no error.
    out, _ = gate_loop(q2, k2, v2, big, mode="sequential")
    assert not torch.isfinite(out).all()


@pytest.mark.parametrize("intra", ["matmul", "recurrent"])
def test_chunked_computes_in_float32_under_autocast(intra: str) -> None:
    # autocast would run the matmul form's products in bfloat16 (and the complex summary
    # cannot be built from bfloat16); the op keeps its documented compute dtype instead
    leaves = _to_dtype(make_leaves(2, 2, 40, 4), torch.float32)
    form = partial(gate_loop_chunked, chunk_size=16, intra=intra)
    want = run_with_grads(form, leaves)

    def forward_under_autocast(*args):  # the backward pass runs outside, as in training
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return form(*args)

    got = run_with_grads(forward_under_autocast, leaves)
    assert got[0].dtype == torch.float32
    assert_close(got, want, 1e-6, f"chunked-{intra} under autocast")
