"""The GroupNorm reference and the public argument checks (pure PyTorch, no kernels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medgn.ops import ACTIVATIONS, group_norm, group_norm_ref
from medgn.ops.group_norm_ref import apply_activation


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize(("shape", "g"), [((2, 6, 5), 3), ((1, 8, 3, 5), 8), ((2, 4, 3, 2, 5), 1)])
def test_reference_matches_torch_in_float64(shape, g, act) -> None:
    gen = torch.Generator().manual_seed(0)
    x, r = (
        torch.randn(shape, generator=gen, dtype=torch.float64),
        torch.randn(shape, dtype=torch.float64),
    )
    w, b = torch.randn(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=torch.float64)
    expected = apply_activation(F.group_norm(x, g, w, b, 1e-5) + r, act, 0.2)
    got = group_norm_ref(x, g, w, b, 1e-5, act, r, negative_slope=0.2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_reference(act: str) -> None:
    gen = torch.Generator().manual_seed(1)
    args = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True)
            for s in ((1, 4, 3, 2, 2), (4,), (4,), (1, 4, 3, 2, 2))]  # fmt: skip

    def f(x, w, b, r):
        return group_norm_ref(x, 2, w, b, 1e-5, act, r)

    assert torch.autograd.gradcheck(f, args)


def test_reference_keeps_variance_at_large_mean() -> None:
    x = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(2)) + 1000.0
    y = group_norm_ref(x, 2)  # fp32 statistics, centred
    y64 = group_norm_ref(x.double(), 2)
    assert (y.double() - y64).abs().max() < 1e-3


@pytest.mark.parametrize("activation", ["none", "relu", "leaky_relu", "silu", "gelu"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_torch_backend_matches_float64_reference(
    activation: str, with_residual: bool, dtype: torch.dtype, tol: float
) -> None:
    # The CPU path uses ATen's fused kernel; the float64 reference is the specification.
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 8, 3, 4, 5, generator=gen) * 3 + 1).to(dtype).requires_grad_()
    w = torch.randn(8, generator=gen).requires_grad_()
    b = torch.randn(8, generator=gen).requires_grad_()
    r = torch.randn(2, 8, 3, 4, 5, generator=gen).to(dtype).requires_grad_() if with_residual else None
    y = group_norm(x, 4, w, b, activation=activation, residual=r, backend="torch")
    assert y.dtype == dtype
    inputs = [x, w, b] + ([r] if r is not None else [])
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = group_norm_ref(
        ref_inputs[0],
        4,
        ref_inputs[1],
        ref_inputs[2],
        activation=activation,
        residual=ref_inputs[3] if r is not None else None,
    )
    torch.testing.assert_close(y.double(), y_ref, atol=tol, rtol=tol)
    dy = torch.randn(y.shape, generator=gen)
    grads = torch.autograd.grad(y, inputs, dy.to(dtype))
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, dy.double())
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_cpu_bf16_goes_to_aten_as_is_with_the_values_of_a_float32_copy(weight_dtype: torch.dtype) -> None:
    # The CPU path hands bfloat16 to ATen's mixed-type kernel; the float32 copy it replaced is the
    # yardstick: outputs within one bf16 rounding, gradients within bf16 noise, weight grads float32.
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 16, 6, 5, 4, generator=gen) * 4 + 2).bfloat16().requires_grad_()
    w = (torch.rand(16, generator=gen) + 0.5).to(weight_dtype).requires_grad_()
    b = torch.randn(16, generator=gen).to(weight_dtype).requires_grad_()
    r = torch.randn(2, 16, 6, 5, 4, generator=gen).bfloat16()
    dy = torch.randn(2, 16, 6, 5, 4, generator=gen).bfloat16()
    # silu: smooth, so a sum that rounds to the other side of 0 cannot flip a gradient as a kink would.
    y = group_norm(x, 4, w, b, activation="silu", residual=r, backend="torch")
    gx, gw, gb = torch.autograd.grad(y, [x, w, b], dy)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y_copy = apply_activation(F.group_norm(x2.float(), 4, w2.float(), b2.float(), 1e-5) + r.float(), "silu", 0.01)
    gx2, gw2, gb2 = torch.autograd.grad(y_copy.bfloat16(), [x2, w2, b2], dy)
    assert y.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16 and gw.dtype == weight_dtype
    torch.testing.assert_close(y.float(), y_copy, atol=0.04, rtol=2**-7)
    torch.testing.assert_close(gx.float(), gx2.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gw.float(), gw2.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gb.float(), gb2.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_channels_last_with_gradients_stays_channels_last_with_identical_values(dtype: torch.dtype) -> None:
    # With gradients on, a channels-last CPU input is normalised contiguous (ATen's channels-last
    # backward is many times slower) and comes back channels-last: same values, same layout.
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(2, 8, 5, 6, 7, generator=gen).to(dtype)
    r = torch.randn(2, 8, 5, 6, 7, generator=gen).to(dtype)
    w, b, dy = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen), torch.randn(base.shape).to(dtype)
    cl = base.contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    flat = base.clone().requires_grad_()
    y_cl = group_norm(cl, 2, w, b, activation="relu", residual=r, backend="torch")
    y_flat = group_norm(flat, 2, w, b, activation="relu", residual=r, backend="torch")
    assert y_cl.is_contiguous(memory_format=torch.channels_last_3d) and not y_cl.is_contiguous()
    assert torch.equal(y_cl, y_flat)
    (g_cl,) = torch.autograd.grad(y_cl, cl, dy)
    (g_flat,) = torch.autograd.grad(y_flat, flat, dy)
    torch.testing.assert_close(g_cl, g_flat, atol=0, rtol=0)


def test_float64_on_torch_backend_stays_float64() -> None:
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    assert group_norm(x, 2, backend="torch").dtype == torch.float64


BAD = [
    (dict(x=torch.randn(1, 6, 4, 4), num_groups=4), ValueError, "not divisible"),
    (dict(x=torch.randn(1, 8, 4, 4), num_groups=2, weight=torch.ones(4)), ValueError, "expected (8,)"),
    (dict(x=torch.randn(1, 8, 4, 4), num_groups=2, bias=torch.ones(8, 1)), ValueError, "bias has shape"),
    (dict(x=torch.randn(1, 8, 4, 4).int(), num_groups=2), TypeError, "dtype torch.int32"),
    (dict(x=torch.randn(8, 4), num_groups=2), ValueError, "rank 2"),
    (dict(x=torch.randn(1, 8, 2, 2, 2, 2), num_groups=2), ValueError, "rank 6"),
    (dict(x=torch.randn(1, 8, 4, 4), num_groups=2, activation="tanh"), ValueError, "unknown activation"),
    (dict(x=torch.randn(1, 8, 4, 4), num_groups=2, residual=torch.randn(1, 8, 4)), ValueError, "residual has shape"),
    (dict(x=torch.randn(1, 8, 4, 4), num_groups=0), ValueError, "positive integer"),
    (dict(x=torch.randn(1, 8, 4, 4), num_groups=2, eps=0.0), ValueError, "eps"),
    (dict(x=torch.randn(1, 8, 4, 4), num_groups=2, backend="cuda"), ValueError, "unknown backend"),
    (dict(x=torch.randn(1, 8, 4, 4, dtype=torch.float64), num_groups=2, backend="triton"), TypeError, "float64"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "error", "text"), BAD)
def test_bad_input_says_what_and_how(kwargs: dict, error: type, text: str) -> None:
    with pytest.raises(error, match=None) as info:
        group_norm(**kwargs)
    assert text in str(info.value)
