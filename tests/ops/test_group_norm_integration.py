"""The GroupNorm custom ops inside PyTorch: determinism, opcheck, torch.compile, autocast, CUDA
graphs, and U-Net-sized shapes on the GPU (CPU through Triton's interpreter; `gpu` on CUDA)."""

from __future__ import annotations

import pytest
import torch
from _gn_helpers import DEVICES, assert_within_rule, make_inputs, max_err, torch_native

from medgn.ops import group_norm, group_norm_ref
from medgn.ops.group_norm_plan import backward_path, forward_path


def _fwd_bwd(inp: dict[str, torch.Tensor], g: int, act: str) -> tuple[torch.Tensor, ...]:
    leaves = [inp[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias", "residual")]
    y = group_norm(leaves[0], g, leaves[1], leaves[2], activation=act, residual=leaves[3],
                   backend="triton")  # fmt: skip
    y.backward(inp["dy"])
    return (y, *(t.grad for t in leaves))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("streamed", [False, True])
def test_two_runs_are_bitwise_identical(device: str, streamed: bool, monkeypatch) -> None:
    if streamed:
        monkeypatch.setattr("medgn.ops.group_norm_plan._FUSED_MAX", 0)
        monkeypatch.setattr("medgn.ops.group_norm_plan._FUSED_BWD_MAX", 0)
    inp = make_inputs((2, 16, 4, 5, 6), torch.float32, True, seed=5, device=device)
    first, second = _fwd_bwd(inp, 4, "silu"), _fwd_bwd(inp, 4, "silu")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("residual_grad", "affine"), [(True, True), (False, True), (True, False)])
def test_eager_path_equals_the_custom_ops(device: str, residual_grad: bool, affine: bool, monkeypatch) -> None:
    """Eager calls skip the custom ops' dispatch; outputs and every gradient stay bit for bit."""
    import sys

    gn_module = sys.modules["medgn.ops.group_norm"]
    inp = make_inputs((2, 16, 4, 5, 6), torch.bfloat16, True, seed=11, device=device)

    def run() -> tuple[torch.Tensor | None, ...]:
        x, r = (inp[k].detach().clone().requires_grad_() for k in ("x", "residual"))
        r.requires_grad_(residual_grad)
        w, b = ((inp[k].detach().clone().requires_grad_() if affine else None) for k in ("weight", "bias"))
        y = group_norm(x, 4, w, b, activation="leaky_relu", residual=r, backend="triton")
        assert y.grad_fn is not None
        y.backward(inp["dy"])
        with torch.no_grad():  # no gradients: the forward launcher alone, no autograd node
            y_inference = group_norm(x, 4, w, b, activation="leaky_relu", residual=r, backend="triton")
        assert y_inference.grad_fn is None and torch.equal(y_inference, y.detach())
        return y, x.grad, r.grad, *((w.grad, b.grad) if affine else ())

    calls = []
    eager_call = gn_module._eager_call
    monkeypatch.setattr(gn_module, "_eager_call", lambda *t: calls.append(eager_call(*t)) or calls[-1])
    eager = run()
    monkeypatch.setattr(gn_module, "_eager_call", lambda *t: False)
    ops = run()
    assert calls == [True, True]
    assert (eager[2] is None) == (ops[2] is None) == (not residual_grad)
    for a, b in zip(eager, ops):
        assert (a is None and b is None) or torch.equal(a, b)


def test_layer_parameters_take_the_eager_path(monkeypatch) -> None:
    """The GroupNorm layer passes nn.Parameters: they are plain enough for the eager path."""
    import sys

    from medgn.layers import GroupNorm

    gn_module = sys.modules["medgn.ops.group_norm"]
    calls = []
    eager_call = gn_module._eager_call
    monkeypatch.setattr(gn_module, "_eager_call", lambda *t: calls.append(eager_call(*t)) or calls[-1])
    layer = GroupNorm(4, 8, activation="relu", backend="triton")
    x = torch.randn(2, 8, 3, 4, 5, requires_grad=True)
    layer(x).sum().backward()
    assert calls == [True] and x.grad is not None and layer.weight.grad is not None


def test_traced_and_transformed_calls_keep_the_custom_ops() -> None:
    """make_fx, jit.trace and vmap cannot run the launchers on their tensors: the custom ops
    (with their fake kernel) stay in those calls, and give what eager gives."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(2, 8, 3, 4, 5)
    w = torch.randn(8)

    def f(t: torch.Tensor) -> torch.Tensor:
        return group_norm(t, 4, w, None, activation="silu", backend="triton")

    graph = make_fx(f)(x)
    assert "medgn.group_norm_fwd" in graph.code
    assert torch.equal(graph(x), f(x))
    traced = torch.jit.trace(f, x, check_trace=False)
    assert torch.equal(traced(x), f(x))
    batched = torch.vmap(f)(x.unsqueeze(1))
    assert torch.equal(batched.squeeze(1), f(x))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_keeps_bf16(device: str) -> None:
    inp = make_inputs((1, 16, 3, 4, 5), torch.bfloat16, False, seed=6, device=device)
    w = inp["weight"].float()  # parameters stay fp32 under autocast
    with torch.autocast(device, dtype=torch.bfloat16):
        y = group_norm(inp["x"], 4, w, None, activation="relu", backend="triton")
    assert y.dtype == torch.bfloat16
    ref = group_norm_ref(inp["x"].double().cpu(), 4, w.double().cpu(), None, 1e-5, "relu")
    assert max_err(y, ref) < 3e-2  # bf16 output rounding: 2^-8 relative at |y| <= 4


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_of_registered_ops(device: str) -> None:
    inp = make_inputs((1, 8, 3, 4, 5), torch.float32, False, seed=7, device=device)
    args = [inp[k].requires_grad_() for k in ("x", "weight", "bias", "residual")]
    torch.library.opcheck(torch.ops.medgn.group_norm_fwd.default, (*args, 4, 1e-5, "silu", 0.01))
    y, mean, rstd = torch.ops.medgn.group_norm_fwd(*[a.detach() for a in args], 4, 1e-5, "silu", 0.01)
    bwd_args = (inp["dy"], *[a.detach() for a in args], mean, rstd, 4, "silu", 0.01, True)
    torch.library.opcheck(torch.ops.medgn.group_norm_bwd.default, bwd_args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces_the_op(device: str) -> None:
    inp = make_inputs((1, 8, 3, 4, 5), torch.float32, False, seed=8, device=device)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return group_norm(x, 2, w, None, activation="gelu", backend="triton") * 2

    # CPU: aot_eager (Inductor's CPU codegen needs a C++ compiler run per test); CUDA: Inductor.
    backend = "inductor" if device == "cuda" else "aot_eager"
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    x = inp["x"].requires_grad_()
    y = compiled(x, inp["weight"])
    assert torch.equal(y, f(inp["x"], inp["weight"]))
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(f(x, inp["weight"]).sum(), x)
    assert torch.equal(g, g_ref)


@pytest.mark.gpu
def test_cuda_graph_capture_replays_forward_and_backward() -> None:
    inp = make_inputs((2, 32, 8, 8, 8), torch.bfloat16, True, seed=10, device="cuda")
    x = inp["x"].detach().requires_grad_()
    static_dy = inp["dy"].clone()

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        y = group_norm(x, 8, inp["weight"], inp["bias"], activation="silu", backend="triton")
        (dx,) = torch.autograd.grad(y, x, static_dy)
        return y, dx

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up on a side stream compiles the kernels before capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_g, dx_g = step()
    with torch.no_grad():
        x.mul_(1.5).add_(0.25)
    graph.replay()
    torch.cuda.synchronize()
    y_e, dx_e = step()
    assert torch.equal(y_g, y_e) and torch.equal(dx_g, dx_e)


# U-Net levels at batch 2 with 1-16 channels per group: on a GPU these take the split path
# (32^3) and the fused path (16^3, 8^3); the CPU interpreter would take minutes on them.
GPU_SHAPES = [((2, 32, 32, 32, 32), 32), ((2, 64, 16, 16, 16), 16), ((2, 320, 8, 8, 8), 20),
              ((2, 16, 24, 20, 28), 4)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("shape", "g"), GPU_SHAPES)
def test_unet_shapes_on_gpu(shape, g, channels_last, dtype) -> None:
    inp = make_inputs(shape, dtype, channels_last, seed=11, device="cuda")
    got = _fwd_bwd(inp, g, "leaky_relu")
    leaves = {k: inp[k].double().cpu().requires_grad_() for k in ("x", "weight", "bias", "residual")}
    y64 = group_norm_ref(leaves["x"], g, leaves["weight"], leaves["bias"], 1e-5, "leaky_relu",
                         leaves["residual"])  # fmt: skip
    y64.backward(inp["dy"].double().cpu())
    nat = {k: inp[k].detach().clone().requires_grad_() for k in ("x", "weight", "bias", "residual")}
    y_nat = torch_native(nat["x"], g, nat["weight"], nat["bias"], "leaky_relu", nat["residual"])
    y_nat.backward(inp["dy"])
    assert_within_rule("y", got[0], y_nat, y64)
    for name, a, k in zip(("dx", "dw", "db", "dres"), got[1:], ("x", "weight", "bias", "residual")):
        assert_within_rule(name, a, nat[k].grad, leaves[k].grad)


def test_paths_chosen_for_unet_levels() -> None:
    # The fused limits cover the deep levels (one launch each way); 32^3 and up stream.
    assert forward_path(torch.empty(2, 320, 8, 8, 8), 20) == "fused"
    assert backward_path(torch.empty(2, 320, 8, 8, 8), 20) == "fused"
    assert forward_path(torch.empty(2, 64, 16, 16, 16), 16) == "fused"
    assert backward_path(torch.empty(2, 64, 16, 16, 16), 16) == "split"
    assert forward_path(torch.empty(2, 32, 32, 32, 32), 32) == "split"


def test_auto_falls_back_to_torch_once_when_triton_cannot_launch(monkeypatch, capsys) -> None:
    # Triton builds a C launcher on first use: without a compiler (a slim image) or with its cache on
    # a noexec tmpfs, every GroupNorm on "auto" failed with an internal error.
    import importlib
    from types import SimpleNamespace

    gn = importlib.import_module("medgn.ops.group_norm")  # the module: medgn.ops.group_norm is also the function

    calls = []

    def no_compiler(device: torch.device) -> None:
        calls.append(device)
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(gn, "_probe_launch", no_compiler)
    monkeypatch.setattr(gn, "_TRITON_INSTALLED", True)
    monkeypatch.setattr(gn, "_TRITON_WORKS", {})
    x = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda", 1))
    assert gn._resolve_backend(x, "auto") == "torch"
    assert gn._resolve_backend(x, "auto") == "torch"  # asked once per device
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot run on cuda:1 (RuntimeError: Failed to find C compiler" in err[0], err
    assert calls == [torch.device("cuda", 1)]
    monkeypatch.setattr(gn, "_probe_launch", lambda device: None)
    other = SimpleNamespace(is_cuda=True, dtype=torch.float32, device=torch.device("cuda", 0))
    assert gn._resolve_backend(other, "auto") == "triton"
    assert gn._resolve_backend(torch.zeros(1, 2, 4), "auto") == "torch"  # a CPU tensor is never probed
    # A graph being compiled is not probed but follows what eager calls found (cuda:1 failed above).
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert gn._resolve_backend(other, "auto") == "torch"
    monkeypatch.setattr(gn, "_TRITON_WORKS", {0: True})
    assert gn._resolve_backend(other, "auto") == "triton"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)

    def full(device: torch.device) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gn, "_probe_launch", full)
    monkeypatch.setattr(gn, "_TRITON_WORKS", {})
    with pytest.raises(torch.OutOfMemoryError):  # a full GPU is no verdict on Triton: asked again later
        gn._resolve_backend(other, "auto")
    assert gn._TRITON_WORKS == {}
