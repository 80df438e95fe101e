"""Shared helpers of the GroupNorm tests: random inputs, PyTorch's own result, the tolerance rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medgn.ops.group_norm_ref import apply_activation

# Every kernel test runs on CPU tensors (Triton's interpreter) and, marked `gpu`, on CUDA tensors.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]

# Extra absolute tolerance per dtype on top of 2 x PyTorch's own error: a few ulps at the output
# scale (|y| ~ 1-5) plus fp32 sums of ~1e3 terms for dweight/dbias, so a result exactly as good as
# PyTorch's never fails on rounding noise alone.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_inputs(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    channels_last: bool,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """x (mean 1, std 2), weight, bias, residual and dy on ``device``, deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=gen) * 2 + 1
    out = {
        "x": x,
        "weight": torch.randn(c, generator=gen),
        "bias": torch.randn(c, generator=gen),
        "residual": torch.randn(shape, generator=gen),
        "dy": torch.randn(shape, generator=gen),
    }
    out = {k: v.to(device=device, dtype=dtype) for k, v in out.items()}
    if channels_last:
        fmt = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
        for k in ("x", "residual", "dy"):
            out[k] = out[k].contiguous(memory_format=fmt)
    return out


def torch_native(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """PyTorch's own GN + residual + activation, computed at x's dtype (the error baseline)."""
    z = F.group_norm(x, num_groups, weight, bias, 1e-5)
    if residual is not None:
        z = z + residual
    return apply_activation(z, activation, 0.01)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference to the float64 reference."""
    return (a.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def assert_within_rule(name: str, got: torch.Tensor, native: torch.Tensor, ref: torch.Tensor) -> None:
    """Kernel error <= 2 x PyTorch's own error at the same dtype + ATOL[dtype]."""
    err, base = max_err(got, ref), max_err(native, ref)
    bound = 2 * base + ATOL[got.dtype]
    assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (PyTorch's own {base:.3g})"
