"""Triton GroupNorm kernels (on CPU through the interpreter) against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from _gn_helpers import assert_within_rule, make_inputs, max_err, torch_native

from medgn.ops import ACTIVATIONS, group_norm, group_norm_ref
from medgn.ops.group_norm_triton import group_norm_forward

# (shape, G): G = 1 (LayerNorm) on an odd 5D shape, G = 8 on a 5D cube, G = C (InstanceNorm) in 4D.
CASES = [((1, 16, 5, 7, 9), 1), ((2, 32, 8, 8, 8), 8), ((2, 8, 6, 10), 8)]


def _run(inp: dict[str, torch.Tensor], g: int, act: str, use_res: bool, backend: str):
    """Forward + backward; return (y, dx, dweight, dbias, dresidual)."""
    leaves = {
        k: inp[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias", "residual")
    }
    x, w, b = leaves["x"], leaves["weight"], leaves["bias"]
    r = leaves["residual"] if use_res else None
    if backend == "ref":
        y = group_norm_ref(x, g, w, b, 1e-5, act, r)
    else:
        y = group_norm(x, g, w, b, activation=act, residual=r, backend=backend)
    y.backward(inp["dy"].to(y.dtype))
    dres = leaves["residual"].grad if use_res else None
    return y, leaves["x"].grad, leaves["weight"].grad, leaves["bias"].grad, dres


def _native_grads(inp: dict[str, torch.Tensor], g: int, act: str, use_res: bool):
    leaves = {
        k: inp[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias", "residual")
    }
    r = leaves["residual"] if use_res else None
    y = torch_native(leaves["x"], g, leaves["weight"], leaves["bias"], act, r)
    y.backward(inp["dy"])
    return (
        y,
        leaves["x"].grad,
        leaves["weight"].grad,
        leaves["bias"].grad,
        (r.grad if use_res else None),
    )


def _check_all(inp: dict[str, torch.Tensor], g: int, act: str, use_res: bool) -> None:
    got = _run(inp, g, act, use_res, "triton")
    ref = _run({k: v.double() for k, v in inp.items()}, g, act, use_res, "ref")
    native = _native_grads(inp, g, act, use_res)
    assert got[0].dtype == inp["x"].dtype and got[0].stride() == inp["x"].stride()
    assert got[1].stride() == inp["x"].stride()
    for name, a, n, r in zip(("y", "dx", "dweight", "dbias", "dresidual"), got, native, ref):
        if r is not None:
            assert_within_rule(name, a, n, r)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize(("shape", "g"), CASES)
def test_forward_and_grads_match_reference_fp32(shape, g, act, channels_last) -> None:
    inp = make_inputs(shape, torch.float32, channels_last)
    _check_all(inp, g, act, use_res=True)


@pytest.mark.parametrize("act", ["none", "gelu"])
def test_without_residual_or_affine(act: str) -> None:
    inp = make_inputs((1, 16, 5, 7, 9), torch.float32, False, seed=1)
    _check_all(inp, 8, act, use_res=False)
    x = inp["x"].detach().requires_grad_()
    y = group_norm(x, 8, activation=act, backend="triton")
    y.backward(inp["dy"])
    x64 = inp["x"].double().requires_grad_()
    group_norm_ref(x64, 8, activation=act).backward(inp["dy"].double())
    assert max_err(y, group_norm_ref(x64, 8, activation=act)) < 1e-5
    assert max_err(x.grad, x64.grad) < 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_within_twice_torch_error(dtype: torch.dtype, channels_last: bool) -> None:
    inp = make_inputs((1, 16, 5, 7, 9), dtype, channels_last, seed=2)
    _check_all(inp, 8, "silu", use_res=True)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("shape", "g"), CASES)
def test_forward_paths_and_saved_statistics(shape, g, channels_last, path) -> None:
    inp = make_inputs(shape, torch.float32, channels_last, seed=3)
    y, mean, rstd = group_norm_forward(
        inp["x"], g, inp["weight"], inp["bias"], 1e-5, "gelu", inp["residual"], 0.01, path=path
    )
    x64 = inp["x"].double()
    ref = group_norm_ref(x64, g, inp["weight"].double(), inp["bias"].double(), 1e-5, "gelu",
                         inp["residual"].double())  # fmt: skip
    assert max_err(y, ref) < 1e-5
    xg = x64.reshape(shape[0], g, -1)
    assert max_err(mean, xg.mean(-1)) < 1e-5
    assert max_err(rstd, (xg.var(-1, unbiased=False) + 1e-5).rsqrt()) < 1e-5


@pytest.mark.parametrize("path", ["fused", "split"])
def test_large_mean_keeps_variance(path: str) -> None:
    # mean 1000, std 1: E[x^2] - E[x]^2 in fp32 loses the variance (1e6 +- ulp 0.06 per term).
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 6, 7, 9, generator=gen) + 1000.0
    y, mean, rstd = group_norm_forward(x, 2, None, None, 1e-5, "none", None, 0.01, path=path)
    x64 = x.double().reshape(2, 2, -1)
    std64 = x64.std(-1, unbiased=False)
    assert max_err(1.0 / rstd.double(), (std64**2 + 1e-5).sqrt()) < 1e-4
    assert max_err(y, group_norm_ref(x.double(), 2)) < 2e-3  # x itself is rounded to 6e-5 at 1000


def test_two_runs_are_bitwise_identical() -> None:
    inp = make_inputs((2, 32, 8, 8, 8), torch.float32, True, seed=5)
    first = _run(inp, 4, "silu", True, "triton")
    second = _run(inp, 4, "silu", True, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_autocast_keeps_bf16() -> None:
    inp = make_inputs((1, 16, 3, 4, 5), torch.bfloat16, False, seed=6)
    w = inp["weight"].float()  # parameters stay fp32 under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = group_norm(inp["x"], 4, w, None, activation="relu", backend="triton")
    assert y.dtype == torch.bfloat16
    ref = group_norm_ref(inp["x"].double(), 4, w.double(), None, 1e-5, "relu")
    assert max_err(y, ref) < 3e-2  # bf16 output rounding: 2^-8 relative at |y| <= 4


def test_opcheck_of_registered_ops() -> None:
    inp = make_inputs((1, 8, 3, 4, 5), torch.float32, False, seed=7)
    args = [inp[k].requires_grad_() for k in ("x", "weight", "bias", "residual")]
    torch.library.opcheck(torch.ops.medgn.group_norm_fwd.default, (*args, 4, 1e-5, "silu", 0.01))
    y, mean, rstd = torch.ops.medgn.group_norm_fwd(
        *[a.detach() for a in args], 4, 1e-5, "silu", 0.01
    )
    bwd_args = (inp["dy"], *[a.detach() for a in args], mean, rstd, 4, "silu", 0.01, True)
    torch.library.opcheck(torch.ops.medgn.group_norm_bwd.default, bwd_args)


def test_torch_compile_traces_the_op() -> None:
    inp = make_inputs((1, 8, 3, 4, 5), torch.float32, False, seed=8)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return group_norm(x, 2, w, None, activation="gelu", backend="triton") * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(inp["x"], inp["weight"]), f(inp["x"], inp["weight"]))
