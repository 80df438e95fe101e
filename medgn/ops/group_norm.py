"""Public GroupNorm operator: backend choice and the ``torch.library`` registration of the kernels.

``group_norm`` computes ``act(group_norm(x) * weight + bias + residual)``. Backend "torch" runs the
pure-PyTorch reference; "triton" runs the fused kernels of ``group_norm_triton`` (CUDA tensors, or
CPU tensors under ``TRITON_INTERPRET=1``); "auto" picks triton for CUDA tensors when triton is
installed and its kernels launch on the device (tried once per device; otherwise a warning, and
torch). The triton path is two custom ops, ``medgn::group_norm_fwd`` and ``medgn::group_norm_bwd``,
with fake (meta) implementations and an autograd formula, so ``torch.compile`` traces through them,
``torch.library.opcheck`` passes, and autocast leaves bf16 inputs in bf16 (custom ops are not on
autocast's upcast list, unlike ``F.group_norm``). Eager calls on plain tensors run the same
launchers and gradient through a ``torch.autograd.Function`` (or, without gradients, the forward
launcher alone): the custom ops' dispatch cost more host time than the kernels at small levels.
Importing this file does not import triton.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
import torch.nn.functional as F

from medgn.ops.group_norm_plan import _channels_last_format, _is_channels_last
from medgn.ops.group_norm_ref import apply_activation, check_group_norm_args
from medgn.ops.group_norm_triton import alloc_like

__all__ = ["BACKENDS", "group_norm"]

#: Backend names accepted by :func:`group_norm` and the GroupNorm layer.
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Whether the triton package is installed, looked up once without importing it: a lookup inside
# group_norm broke torch.compile's full graph (torch 2.11's dynamo does not trace find_spec).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _triton_available() -> bool:
    """True when the triton package is installed."""
    return _TRITON_INSTALLED


# Per CUDA device: whether Triton's kernels launch there. Triton builds a small C launcher the first
# time it runs, which needs a C compiler and Python's headers, and loads it from TRITON_CACHE_DIR,
# which a filesystem mounted noexec refuses; without them "auto" would fail every GroupNorm.
_TRITON_WORKS: dict[int, bool] = {}


def _probe_launch(device: torch.device) -> None:
    """One forward launch of the Triton kernel on a tiny tensor (raises what Triton raises)."""
    from medgn.ops.group_norm_triton import group_norm_forward

    group_norm_forward(torch.zeros(1, 2, 8, device=device), 1, None, None, 1e-5, "none", None, 0.01)


def _triton_works(device: torch.device) -> bool:
    """Whether a tiny forward launch succeeds on ``device`` (tried once per device); when it fails,
    say why once and let "auto" use the torch backend instead."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TRITON_WORKS:
        try:
            _probe_launch(torch.device("cuda", index))
            _TRITON_WORKS[index] = True
        except torch.OutOfMemoryError:  # a full GPU says nothing about Triton: asked again next time
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to build or launch means: not here
            from medgn.errors import brief
            from medgn.logs import warn_user

            _TRITON_WORKS[index] = False
            warn_user(
                f"medgn's Triton GroupNorm kernels cannot run on cuda:{index} ({type(exc).__name__}: "
                f"{brief(exc, 160)}); GroupNorm uses PyTorch's kernels instead (slower). The usual causes: no C "
                "compiler or Python headers for Triton's launcher, or a TRITON_CACHE_DIR that does not allow "
                "executables (a noexec /tmp)"
            )
    return _TRITON_WORKS[index]


def _interpreting() -> bool:
    """True when Triton's CPU interpreter is switched on for this process."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@torch.library.custom_op(
    "medgn::group_norm_fwd",
    mutates_args=(),
    schema="(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, int num_groups, float eps, "
    "str activation, float negative_slope) -> (Tensor, Tensor, Tensor)",
)
def _fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    num_groups: int,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from medgn.ops.group_norm_triton import group_norm_forward

    return group_norm_forward(x, num_groups, weight, bias, eps, activation, residual, negative_slope)


@_fwd_op.register_fake
def _fwd_fake(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    num_groups: int,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return alloc_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op(
    "medgn::group_norm_bwd",
    mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor mean, "
    "Tensor rstd, int num_groups, str activation, float negative_slope, bool need_dres) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
def _bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    activation: str,
    negative_slope: float,
    need_dres: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from medgn.ops.group_norm_triton import group_norm_backward

    return group_norm_backward(
        dy, x, weight, bias, residual, mean, rstd, num_groups, activation, negative_slope, need_dres
    )


@_bwd_op.register_fake
def _bwd_fake(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    activation: str,
    negative_slope: float,
    need_dres: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dw = torch.empty_like(weight) if weight is not None else x.new_empty((0,))
    db = torch.empty_like(bias) if bias is not None else x.new_empty((0,))
    dres = alloc_like(residual) if (need_dres and residual is not None) else x.new_empty((0,))
    return alloc_like(x), dw, db, dres


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, bias, residual, num_groups, _eps, activation, negative_slope = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, residual, mean, rstd)
    ctx.num_groups = num_groups
    ctx.activation = activation
    ctx.negative_slope = negative_slope


def _gradients(ctx: Any, dy: torch.Tensor, backward: Any) -> tuple[Any, ...]:
    """Gradients of the forward's 8 inputs from ``backward`` (the custom op or the launcher)."""
    x, weight, bias, residual, mean, rstd = ctx.saved_tensors
    need_dres = residual is not None and bool(ctx.needs_input_grad[3])
    dx, dw, db, dres = backward(
        dy, x, weight, bias, residual, mean, rstd,
        ctx.num_groups, ctx.activation, ctx.negative_slope, need_dres,
    )  # fmt: skip
    dw, db = (dw if weight is not None else None), (db if bias is not None else None)
    return dx, dw, db, (dres if need_dres else None), None, None, None, None


def _backward(ctx: Any, dy: torch.Tensor, _dmean: Any, _drstd: Any) -> tuple[Any, ...]:
    return _gradients(ctx, dy, _bwd_op)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerGroupNorm(torch.autograd.Function):
    """The same kernels and gradient as the custom ops, for eager calls without their dispatch.

    On an H200 (torch 2.11, Triton 3.6) a forward and backward at 2x256x16^3 took 1.39 ms of host
    time through the registered custom ops and 1.07 ms through this Function, for 40 us of GPU
    work (``benchmarks/results/group_norm_h200.md``). Small U-Net levels are host-bound, so eager
    calls (not traced by torch.compile, plain tensors) take this ``autograd.Function`` instead.
    """

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> torch.Tensor:  # the custom forward op's 8 inputs
        from medgn.ops.group_norm_triton import group_norm_forward

        x, weight, bias, residual, num_groups, eps, activation, negative_slope = inputs
        y, mean, rstd = group_norm_forward(x, num_groups, weight, bias, eps, activation, residual, negative_slope)
        _setup_context(ctx, inputs, (y, mean, rstd))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        from medgn.ops.group_norm_triton import group_norm_backward

        return _gradients(ctx, dy, group_norm_backward)


def _eager_call(*tensors: torch.Tensor | None) -> bool:
    """True when a call can skip the custom ops: plain tensors or parameters, run as they are.

    Anything that records or transforms the call needs the custom ops: torch.compile, jit
    tracing, make_fx and fake tensors (dispatch modes), vmap and other functorch transforms.
    """
    if _MODE_CHECKS is None or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    functorch_active, dispatch_depth = _MODE_CHECKS
    if functorch_active() or dispatch_depth() > 0:
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


# nn.Parameter too: the GroupNorm layer passes its weight and bias.
_PLAIN = (torch.Tensor, torch.nn.Parameter)
# torch's private checks for functorch transforms and dispatch modes; a torch without them gets
# the custom ops always (correct, only slower).
_MODE_CHECKS = (
    (torch._C._are_functorch_transforms_active, torch._C._len_torch_dispatch_stack)
    if hasattr(torch._C, "_are_functorch_transforms_active") and hasattr(torch._C, "_len_torch_dispatch_stack")
    else None
)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _resolve_backend(x: torch.Tensor, backend: str) -> str:
    """Turn "auto" into a concrete backend and check that "triton" can run on ``x``."""
    if backend not in BACKENDS:
        raise ValueError(f"group_norm: unknown backend {backend!r}, expected one of {BACKENDS}")
    if backend == "auto":
        ok = x.is_cuda and x.dtype in _TRITON_DTYPES and _triton_available()
        if ok:  # a graph being compiled takes what eager calls found (the probe itself is not traced)
            ok = all(_TRITON_WORKS.values()) if torch.compiler.is_compiling() else _triton_works(x.device)
        return "triton" if ok else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("group_norm: backend='triton' needs the triton package; use backend='torch'")
        if x.dtype not in _TRITON_DTYPES:
            raise TypeError(
                f"group_norm: backend='triton' takes float32/bfloat16/float16 input, got {x.dtype}; "
                "use backend='torch' for float64"
            )
        if not x.is_cuda and not _interpreting():
            raise ValueError(
                f"group_norm: backend='triton' needs a CUDA tensor, got one on {x.device}; use "
                "backend='torch', or set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU"
            )
    return backend


def _group_norm_native(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    act: str,
    residual: torch.Tensor | None,
    negative_slope: float,
) -> torch.Tensor:
    """The torch backend: PyTorch's own fused GroupNorm kernel, then the residual and activation.

    ATen's kernel computes the same statistics as :func:`group_norm_ref` (centred, float32
    accumulation) in one pass on the CPU, 2-3x faster than the reference's separate tensor ops;
    half inputs are normalised in float32 like the reference does. Two CPU specifics (measured
    with torch 2.13 on 2 cores, 2x16x64x64x32 activations, forward and backward):
    - bfloat16 goes to the kernel as it is: ATen normalises it with float32 statistics and float32
      weights itself, the same values as a float32 copy would give, without the two copies;
    - ATen's backward over channels-last tensors is 4.6x (float32) to 30x (bfloat16) slower than
      over contiguous ones, so with gradients on, a channels-last input is normalised contiguous
      and handed back channels-last (the copies cost a fraction of that).
    """
    if x.device.type == "cpu" and torch.is_grad_enabled() and _is_channels_last(x):
        fmt = _channels_last_format(x)
        res = residual.contiguous() if residual is not None else None
        y = _group_norm_native(x.contiguous(), num_groups, weight, bias, eps, act, res, negative_slope)
        return y.contiguous(memory_format=fmt)
    # bfloat16 on the CPU goes to ATen as it is; other half inputs are normalised as a float32 copy.
    direct = x.device.type == "cpu" and x.dtype == torch.bfloat16
    return _aten_group_norm(x, num_groups, weight, bias, eps, act, residual, negative_slope, copy_half=not direct)


def _aten_group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    act: str,
    residual: torch.Tensor | None,
    negative_slope: float,
    copy_half: bool = True,
) -> torch.Tensor:
    """ATen's GroupNorm in the input's layout, then the residual and the activation.

    With ``copy_half`` a half input is normalised as a float32 copy (medgn 0.1's path everywhere,
    still the one off the CPU); without, ATen's mixed-type kernel takes it as it is. Half inputs
    get float32 weights either way.
    """
    half = x.dtype in (torch.float16, torch.bfloat16)
    xc = x.float() if half and copy_half else x
    wdtype = torch.float32 if half else x.dtype
    w = weight.to(wdtype) if weight is not None else None
    b = bias.to(wdtype) if bias is not None else None
    y = F.group_norm(xc, num_groups, w, b, eps)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return apply_activation(y, act, negative_slope).to(x.dtype)


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    negative_slope: float = 0.01,
    backend: str = "auto",
) -> torch.Tensor:
    """GroupNorm fused with a per-channel affine, a residual add and an activation.

    ``y = act((x - mean) * rstd * weight + bias + residual)``, statistics per (sample, group) in
    float32, output in x's dtype and memory format (contiguous or channels_last(_3d)).

    Args:
        x: (N, C, L), (N, C, H, W) or (N, C, D, H, W) tensor; float32, bfloat16 or float16
            (float64 on the torch backend).
        num_groups: G, a divisor of C.
        weight: gamma of shape (C,) or None.
        bias: beta of shape (C,) or None.
        eps: added to the variance before the square root.
        activation: None/"none", "relu", "leaky_relu", "silu" or "gelu" (exact erf form).
        residual: tensor of x's shape added before the activation, or None.
        negative_slope: slope of "leaky_relu" for negative inputs.
        backend: "auto", "triton" or "torch" (see the module docstring).

    Returns:
        y, same shape and dtype as x; differentiable in x, weight, bias and residual.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, activation or backend (the message says the fix).
    """
    act = check_group_norm_args(x, num_groups, weight, bias, eps, activation, residual, negative_slope)
    if _resolve_backend(x, backend) == "torch":
        return _group_norm_native(x, num_groups, weight, bias, eps, act, residual, negative_slope)
    args = (x, weight, bias, residual, num_groups, float(eps), act, float(negative_slope))
    if _eager_call(x, weight, bias, residual):
        if _needs_grad(x, weight, bias, residual):
            return _EagerGroupNorm.apply(*args)
        from medgn.ops.group_norm_triton import group_norm_forward

        return group_norm_forward(x, num_groups, weight, bias, float(eps), act, residual, float(negative_slope))[0]
    y, _mean, _rstd = _fwd_op(*args)
    return y
