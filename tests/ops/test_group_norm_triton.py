"""Triton GroupNorm kernels against the float64 reference, on CPU (interpreter) and CUDA (`gpu`).

Every test takes the device as a parameter: "cpu" runs the kernels through Triton's interpreter,
"cuda" (marked `gpu`, skipped without a GPU) runs the same checks on the GPU. The ``kernel_path``
fixture runs the autograd tests once on the fused one-program kernels and once with the fused
limits set to 0, so the streaming split kernels (statistics + apply, reduce + dx) run instead.
"""

from __future__ import annotations

import pytest
import torch
from _gn_helpers import DEVICES, assert_within_rule, make_inputs, max_err, torch_native

import medgn.ops.group_norm_plan as plan
from medgn.ops import ACTIVATIONS, group_norm, group_norm_ref
from medgn.ops.group_norm_triton import group_norm_backward, group_norm_forward

# (shape, G): LayerNorm on an odd 5D shape; 4 channels per group on a 5D cube; InstanceNorm in
# 4D; 2 channels per group with G = 6 (not a power of two: channels_last blocks of 2 groups);
# 10 channels per group (not a power of two: masked channel lanes).
CASES = [
    ((1, 16, 5, 7, 9), 1),
    ((2, 32, 6, 6, 6), 8),
    ((2, 8, 6, 10), 8),
    ((3, 12, 7, 5, 3), 6),
    ((2, 20, 4, 5, 6), 2),
]


# The streamed kernels are slow in the interpreter (many programs): two activations, one with
# and one without a derivative that needs the recomputed pre-activation, cover their branches.
STREAMED_ACTS = ("none", "gelu")


def _use_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """ "fused": the launchers' own choice (fused on these shapes); "streamed": split kernels."""
    if path == "streamed":
        monkeypatch.setattr(plan, "_FUSED_MAX", 0)
        monkeypatch.setattr(plan, "_FUSED_BWD_MAX", 0)


@pytest.fixture(params=["fused", "streamed"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    _use_path(monkeypatch, request.param)
    return request.param


def _run(inp: dict[str, torch.Tensor], g: int, act: str, use_res: bool, backend: str):
    """Forward + backward; return (y, dx, dweight, dbias, dresidual)."""
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias", "residual")}
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
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias", "residual")}
    r = leaves["residual"] if use_res else None
    y = torch_native(leaves["x"], g, leaves["weight"], leaves["bias"], act, r)
    y.backward(inp["dy"])
    grads = (leaves["x"].grad, leaves["weight"].grad, leaves["bias"].grad)
    return (y, *grads, (r.grad if use_res else None))


def _check_all(inp: dict[str, torch.Tensor], g: int, act: str, use_res: bool) -> None:
    got = _run(inp, g, act, use_res, "triton")
    ref = _run({k: v.double().cpu() for k, v in inp.items()}, g, act, use_res, "ref")
    native = _native_grads(inp, g, act, use_res)
    assert got[0].dtype == inp["x"].dtype and got[0].stride() == inp["x"].stride()
    assert got[1].stride() == inp["x"].stride()
    for name, a, n, r in zip(("y", "dx", "dweight", "dbias", "dresidual"), got, native, ref):
        if r is not None:
            assert_within_rule(name, a, n, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("act", "path"),
    [(a, "fused") for a in ACTIVATIONS] + [(a, "streamed") for a in STREAMED_ACTS],
)
@pytest.mark.parametrize(("shape", "g"), CASES)
def test_forward_and_grads_match_reference_fp32(shape, g, act, path, channels_last, device,
                                                 monkeypatch) -> None:  # fmt: skip
    _use_path(monkeypatch, path)
    inp = make_inputs(shape, torch.float32, channels_last, device=device)
    _check_all(inp, g, act, use_res=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_without_residual_or_affine(act: str, device: str, kernel_path: str) -> None:
    inp = make_inputs((1, 16, 5, 7, 9), torch.float32, False, seed=1, device=device)
    _check_all(inp, 8, act, use_res=False)
    x = inp["x"].detach().requires_grad_()
    y = group_norm(x, 8, activation=act, backend="triton")
    y.backward(inp["dy"])
    x64 = inp["x"].double().cpu().requires_grad_()
    group_norm_ref(x64, 8, activation=act).backward(inp["dy"].double().cpu())
    assert max_err(y, group_norm_ref(x64, 8, activation=act)) < 1e-5
    assert max_err(x.grad, x64.grad) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_within_twice_torch_error(dtype, channels_last, device, kernel_path) -> None:
    inp = make_inputs((1, 16, 5, 7, 9), dtype, channels_last, seed=2, device=device)
    _check_all(inp, 8, "silu", use_res=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["fused", "split", "chunked"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("shape", "g"), CASES)
def test_forward_paths_and_saved_statistics(shape, g, channels_last, path, device) -> None:
    inp = make_inputs(shape, torch.float32, channels_last, seed=3, device=device)
    y, mean, rstd = group_norm_forward(
        inp["x"], g, inp["weight"], inp["bias"], 1e-5, "gelu", inp["residual"], 0.01, path=path
    )
    i64 = {k: v.double().cpu() for k, v in inp.items()}
    ref = group_norm_ref(i64["x"], g, i64["weight"], i64["bias"], 1e-5, "gelu", i64["residual"])
    assert max_err(y, ref) < 1e-5
    xg = i64["x"].reshape(shape[0], g, -1)
    assert max_err(mean, xg.mean(-1)) < 1e-5
    assert max_err(rstd, (xg.var(-1, unbiased=False) + 1e-5).rsqrt()) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["fused", "split", "chunked"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("shape", "g"), CASES[2:])
def test_backward_paths_match_reference(shape, g, channels_last, path, device) -> None:
    inp = make_inputs(shape, torch.float32, channels_last, seed=9, device=device)
    i64 = {k: v.double().cpu().requires_grad_() for k, v in inp.items()}
    y64 = group_norm_ref(i64["x"], g, i64["weight"], i64["bias"], 1e-5, "silu", i64["residual"])
    y64.backward(i64["dy"])
    _y, mean, rstd = group_norm_forward(inp["x"], g, inp["weight"], inp["bias"], 1e-5, "silu", inp["residual"], 0.01)
    got = group_norm_backward(
        inp["dy"], inp["x"], inp["weight"], inp["bias"], inp["residual"], mean, rstd, g, "silu",
        0.01, True, path=path,
    )  # fmt: skip
    names, keys = ("dx", "dweight", "dbias", "dresidual"), ("x", "weight", "bias", "residual")
    for name, a, k in zip(names, got, keys):
        # fp32 sums over <= 1e3 terms of O(1) values: 1e-4 absolute leaves 10x margin.
        assert max_err(a, i64[k].grad) < 1e-4, name
    assert got[0].stride() == inp["x"].stride()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("path", ["fused", "split", "chunked"])
def test_large_mean_keeps_variance(path: str, channels_last: bool, device: str) -> None:
    # mean 1000, std 1: E[x^2] - E[x]^2 in fp32 loses the variance (1e6 +- ulp 0.06 per term).
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 6, 7, 9, generator=gen) + 1000.0
    xd = x.to(device)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last_3d)
    y, mean, rstd = group_norm_forward(xd, 2, None, None, 1e-5, "none", None, 0.01, path=path)
    x64 = x.double().reshape(2, 2, -1)
    std64 = x64.std(-1, unbiased=False)
    assert max_err(1.0 / rstd.double(), (std64**2 + 1e-5).sqrt()) < 1e-4
    assert max_err(y, group_norm_ref(x.double(), 2)) < 2e-3  # x itself is rounded to 6e-5 at 1000


@pytest.mark.parametrize("device", DEVICES)
def test_single_element_groups_compile(device: str) -> None:
    # CPG = 1 and S = 1: Triton specialises both to the constant 1 (the old (CPG * S).to() bug).
    x = torch.randn(2, 4, 1, 1, 1, device=device)
    for path in ("fused", "split"):
        y, mean, _ = group_norm_forward(x, 4, None, None, 1e-5, "none", None, 0.01, path=path)
        assert max_err(mean, x.reshape(2, 4)) == 0.0
        assert max_err(y, torch.zeros_like(x)) == 0.0  # x - mean is exactly 0


@pytest.mark.parametrize("shape", [(0, 32, 4, 4, 4), (2, 32, 0, 4, 4)])
def test_empty_batch_or_volume_launches_nothing(shape, kernel_path) -> None:
    """An empty batch (N = 0) or volume gives an empty output and zero dW/dB, like PyTorch."""
    from medgn.ops import group_norm

    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    y = group_norm(x, 8, w, b, activation="relu", backend="triton")
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(32)) and torch.equal(b.grad, torch.zeros(32))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_weight_and_bias_are_read_by_their_strides(device: str, kernel_path: str) -> None:
    """A ``[::2]`` weight (a direct caller's view) was read as contiguous: errors of 9 against the reference."""
    inp = make_inputs((2, 8, 4, 5, 6), torch.float32, False, seed=3, device=device)
    wide_w = torch.randn(16, device=device)
    wide_b = torch.randn(16, device=device)
    w, b = wide_w[::2], wide_b[::2]  # strided views
    assert not w.is_contiguous()
    x = inp["x"].detach().requires_grad_()
    wl, bl = w.detach().requires_grad_(), b.detach().requires_grad_()
    y = group_norm(x, 4, wl, bl, activation="leaky_relu", backend="triton")
    y.backward(inp["dy"])
    xr = inp["x"].detach().double().cpu().requires_grad_()
    wr, br = w.detach().double().cpu().requires_grad_(), b.detach().double().cpu().requires_grad_()
    yr = group_norm_ref(xr, 4, wr, br, 1e-5, "leaky_relu")
    yr.backward(inp["dy"].double().cpu())
    assert max_err(y, yr) < 1e-4
    assert max_err(x.grad, xr.grad) < 1e-4
    assert max_err(wl.grad, wr.grad) < 1e-3 and max_err(bl.grad, br.grad) < 1e-3


def test_the_launchers_run_on_the_inputs_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the current CUDA device: a tensor on cuda:1 must make cuda:1 current."""
    import contextlib

    import medgn.ops.group_norm_triton as launchers

    assert isinstance(launchers.on_device(torch.zeros(1)), contextlib.nullcontext)  # a CPU tensor: nothing to switch
    entered: list[object] = []

    @contextlib.contextmanager
    def record(x: torch.Tensor):
        entered.append(x.device)
        yield

    monkeypatch.setattr(launchers, "on_device", record)
    inp = make_inputs((1, 4, 3, 3, 3), torch.float32, False, seed=0, device="cpu")
    y, mean, rstd = group_norm_forward(inp["x"], 2, inp["weight"], inp["bias"], 1e-5, "none", None, 0.01)
    group_norm_backward(inp["dy"], inp["x"], inp["weight"], inp["bias"], None, mean, rstd, 2, "none", 0.01, False)
    assert entered == [inp["x"].device, inp["dy"].device]
