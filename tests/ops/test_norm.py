"""The fused RMS norm against its plain reference: outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from memtx.ops.norm import rms_norm, rms_norm_ref


def run(fn, x, w, grad):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w, x.shape[-1] ** 0.5)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    return y.detach(), gx, gw


@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 1), (2, 0, 8)])
def test_matches_reference_in_float64(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    if x.numel():
        x.view(-1, shape[-1])[0] = 0.0  # a zero row stays zero, with the clamped gradient
        x.view(-1, shape[-1])[-1] *= 1e-14  # below the clamp
    w = torch.randn(shape[-1], generator=g, dtype=torch.float64)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    got, want = run(rms_norm, x, w, grad), run(rms_norm_ref, x, w, grad)
    for name, a, b in zip(("out", "grad x", "grad weight"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), f"{name}: {(a - b).abs().max()}"


def test_float32_close_and_mixed_dtypes_promote():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 32, generator=g)
    w = torch.randn(32, generator=g)
    grad = torch.randn(4, 9, 32, generator=g)
    got, want = run(rms_norm, x, w, grad), run(rms_norm_ref, x.double(), w.double(), grad.double())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    got = run(rms_norm, xb, w, grad)  # bfloat16 activations, float32 gain: float32 out
    want = run(rms_norm_ref, xb.double(), w.double(), grad.double())
    assert got[0].dtype == torch.float32
    for a, b in zip(got, want):
        assert torch.allclose(a.double(), b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiny_rows_keep_finite_gradients(dtype):
    # rows far below 1 (norm 3e-12 in float32, 3e-2 in float16): c = scale / ||x|| is large
    # and its cube would overflow; the gradient must stay finite and equal the reference's
    g = torch.Generator().manual_seed(2)
    size = 3e-12 if dtype == torch.float32 else 3e-2
    x = torch.randn(4, 1024, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True) * size
    w = torch.randn(1024, generator=g, dtype=torch.float64)
    grad = torch.randn(4, 1024, generator=g, dtype=torch.float64)
    got = run(rms_norm, x.to(dtype), w.to(dtype), grad.to(dtype))
    want = run(rms_norm_ref, x, w, grad)
    for name, a, b in zip(("out", "grad x", "grad weight"), got, want):
        assert torch.isfinite(a).all(), name
        assert torch.allclose(a.double(), b, rtol=1e-2, atol=1e-2 * b.abs().max()), name


def test_weight_of_wrong_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\) to match"):
        rms_norm(torch.randn(2, 8), torch.ones(7), 1.0)


# ============================================================================================
# layer_norm_linear: linear(layer_norm(x)) for a constant x (a memory)
# ============================================================================================
def _norm_linear(dim, features, bias, dtype, seed):
    torch.manual_seed(seed)
    norm, linear = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, features, bias=bias)
    with torch.no_grad():  # gain and bias away from their 1 and 0 initialisation
        norm.weight.normal_(1.0, 0.5)
        norm.bias.normal_(0.0, 0.5)
    return norm.to(dtype), linear.to(dtype)


def _param_grads(fn, x, norm, linear, grad):
    params = [norm.weight, norm.bias, *linear.parameters()]
    out = fn(x, norm, linear)
    return out.detach(), torch.autograd.grad(out, params, grad)


@pytest.mark.parametrize("bias", [True, False], ids=["linear-bias", "no-linear-bias"])
@pytest.mark.parametrize("shape", [(3, 7, 16), (5, 16), (2, 0, 16)])
def test_layer_norm_linear_matches_reference_in_float64(shape, bias):
    from memtx.ops.norm import _LayerNormLinear, layer_norm_linear, layer_norm_linear_ref

    norm, linear = _norm_linear(shape[-1], 24, bias, torch.float64, seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    grad = torch.randn(*shape[:-1], 24, generator=g, dtype=torch.float64)
    got_out, got = _param_grads(layer_norm_linear, x, norm, linear, grad)
    want_out, want = _param_grads(layer_norm_linear_ref, x, norm, linear, grad)
    assert torch.allclose(got_out, want_out, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("gain", "norm bias", "weight", "linear bias"), got, want):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-10), name
    # the fused node is what ran, and it keeps no normalised copy of x
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer_norm_linear(x, norm, linear)
    assert type(out.grad_fn).__name__ == _LayerNormLinear.__name__ + "Backward"
    assert sum(t.numel() for t in saved if t.shape == x.shape) == x.numel()  # x itself only


def test_layer_norm_linear_falls_back_where_the_input_needs_a_gradient():
    from memtx.ops.norm import layer_norm_linear, layer_norm_linear_ref

    norm, linear = _norm_linear(8, 6, True, torch.float64, seed=2)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    out = layer_norm_linear(x, norm, linear)
    (gx,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(layer_norm_linear_ref(x, norm, linear).sum(), x)
    assert torch.allclose(gx, want)


def test_layer_norm_linear_float32_is_close_to_float64():
    from memtx.ops.norm import layer_norm_linear, layer_norm_linear_ref

    norm, linear = _norm_linear(32, 64, True, torch.float32, seed=3)
    norm64, linear64 = _norm_linear(32, 64, True, torch.float64, seed=3)
    x = torch.randn(6, 10, 32)
    grad = torch.randn(6, 10, 64)
    got_out, got = _param_grads(layer_norm_linear, x, norm, linear, grad)
    want_out, want = _param_grads(layer_norm_linear_ref, x.double(), norm64, linear64, grad.double())
    assert torch.allclose(got_out.double(), want_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4)
