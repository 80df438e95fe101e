"""Model summary: parameters, MACs and a training-memory estimate, from a forward on the meta device.

:func:`summary` runs one forward of a copy of the model on the ``meta`` device (no memory, no
compute), with hooks that record every convolution's multiply-accumulates and every tensor that
autograd keeps for the backward pass. The saved-tensor rules follow PyTorch's autograd formulas and
medgn's fused GPU GroupNorm: a convolution keeps its input; ``nn.GroupNorm``/BatchNorm/InstanceNorm
keep their input; medgn's GroupNorm keeps its input and residual (it recomputes the activation); ReLU
keeps its output, LeakyReLU/SiLU/GELU their input; tensors kept twice count once. With per-stage
activation checkpointing only the stage boundaries stay, plus one stage recomputed at a time. A
16-bit ``dtype`` counts what CUDA autocast keeps: PyTorch's GroupNorm and LayerNorm run in float32
there (a float32 copy of the input kept, float32 out, so the activation after them keeps float32);
medgn's GroupNorm keeps the input's dtype.
:func:`estimate_training_memory_bytes` is the data planner's entry: it builds the network straight
on the meta device from a :class:`UNet3DConfig`, so it takes milliseconds at any patch size.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medgn.layers.conv_norm_act import Size3
from medgn.layers.group_norm import GroupNorm
from medgn.models.config import UNet3DConfig
from medgn.models.registry import build_model

_KEEP_INPUT = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.GroupNorm,  # includes medgn's GroupNorm (a subclass); its residual is added below
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LeakyReLU,
    nn.SiLU,
    nn.GELU,
    nn.ELU,
    nn.PReLU,
)
_KEEP_OUTPUT = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Softmax)
# Modules that 16-bit autocast runs in float32 (PyTorch's group_norm and layer_norm; medgn's
# GroupNorm is a custom op that keeps the input's dtype), and elementwise modules whose float32
# input gives a float32 output. A convolution after them keeps its own 16-bit copy of its input.
_AUTOCAST_FLOAT32 = (nn.GroupNorm, nn.LayerNorm)
_ELEMENTWISE = (nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ELU, nn.PReLU, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.Dropout)
# Optimizer state per parameter: SGD with momentum (nnU-Net's optimizer) keeps one buffer.
DEFAULT_OPTIMIZER_STATES = 1
# The loss keeps about one more tensor per output (log-softmax for cross-entropy, softmax for Dice).
LOSS_COPIES_PER_OUTPUT = 1
# In the backward pass about two gradient tensors of the largest kept size are alive at once
# (the incoming gradient and the one being produced).
BACKWARD_TRANSIENT_COPIES = 2


class _Recorder:
    """Forward hooks that record MACs and the tensors autograd would save."""

    def __init__(self, model: nn.Module, segments: dict[str, tuple[str, bool, bool]], autocast: bool = False) -> None:
        self.macs = 0
        self.saved: dict[int, tuple[torch.Tensor, str]] = {}  # id -> (tensor, segment or "")
        # Under 16-bit autocast: ids of tensors that hold float32 values (PyTorch's GroupNorm runs
        # in float32 and returns float32; elementwise modules after it stay float32).
        self.autocast = autocast
        self.float32: dict[int, torch.Tensor] = {}  # id -> tensor (held, so no id is reused)
        self.boundaries: dict[int, torch.Tensor] = {}
        self.handles = []
        for name, module in model.named_modules():
            segment = next((s for p, (s, _, _) in segments.items() if name == p or name.startswith(p + ".")), "")
            if name in segments:
                _, entry, exit_ = segments[name]
                self.handles.append(module.register_forward_hook(self._boundary(entry, exit_)))
            if not list(module.children()):
                self.handles.append(module.register_forward_hook(self._leaf(segment), with_kwargs=True))

    def _keep(self, t: Any, segment: str) -> None:
        if isinstance(t, torch.Tensor) and id(t) not in self.saved:
            self.saved[id(t)] = (t, segment)

    def _boundary(self, entry: bool, exit_: bool):
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            for t in (*(args if entry else ()), *((out,) if exit_ else ())):
                if isinstance(t, torch.Tensor):
                    self.boundaries[id(t)] = t

        return hook

    def _leaf(self, segment: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x = args[0] if args else None
            if isinstance(module, nn.modules.conv._ConvTransposeNd) and isinstance(x, torch.Tensor):
                k = math.prod(module.kernel_size)
                self.macs += x.numel() * (module.out_channels // module.groups) * k
            elif isinstance(module, nn.modules.conv._ConvNd) and isinstance(out, torch.Tensor):
                k = math.prod(module.kernel_size)
                self.macs += out.numel() * (module.in_channels // module.groups) * k
            elif isinstance(module, nn.Linear) and isinstance(out, torch.Tensor):
                self.macs += out.numel() * module.in_features
            if not torch.is_grad_enabled():
                return
            if self.autocast and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
                if isinstance(module, _AUTOCAST_FLOAT32) and not isinstance(module, GroupNorm):
                    # Autocast casts the input to a float32 copy, which the op keeps, and returns float32.
                    x = x.new_empty(x.shape)
                    self.float32.update({id(x): x, id(out): out})
                elif id(x) in self.float32:
                    if isinstance(module, _ELEMENTWISE):
                        self.float32[id(out)] = out
                    else:  # a convolution casts its float32 input to a 16-bit copy and keeps that
                        x = x.new_empty(x.shape)
            if isinstance(module, _KEEP_INPUT):
                self._keep(x, segment)
                if isinstance(module, GroupNorm):
                    self._keep(kwargs.get("residual", args[1] if len(args) > 1 else None), segment)
            elif isinstance(module, _KEEP_OUTPUT):
                self._keep(out, segment)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _checkpoint_segments(model: nn.Module) -> dict[str, tuple[str, bool, bool]]:
    """UNet3D stages recomputed together under activation checkpointing.

    Maps a module-name prefix to (segment, its inputs stay, its output stays): an encoder stage
    keeps its input and output; a decoder stage (upsampling + convolutions) keeps the upsampling's
    input and the last convolution's output, never the concatenation inside it.
    """
    if not getattr(model, "checkpoint", False) or not hasattr(model, "encoder"):
        return {}
    segments = {f"encoder.{i}": (f"encoder.{i}", True, True) for i in range(len(model.encoder))}
    for i in range(len(getattr(model, "decoder", []))):
        segments[f"upsample.{i}"] = (f"decoder.{i}", True, False)
        segments[f"decoder.{i}"] = (f"decoder.{i}", False, True)
    return segments


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for t in out if isinstance(t, torch.Tensor)]
    return []


def summary(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 2,
    dtype: torch.dtype = torch.float32,
    training: bool = True,
    optimizer_states: int = DEFAULT_OPTIMIZER_STATES,
) -> dict[str, Any]:
    """Parameters, MACs and memory of ``model`` for one batch of ``input_shape``.

    Args:
        model: any module; it is copied to the meta device, the original is not touched.
        input_shape: (C, D, H, W) of one sample, or (D, H, W) when the model has ``in_channels``.
        batch_size: samples per batch N.
        dtype: activation dtype (bfloat16/float16 under autocast); parameters count as float32.
        training: estimate for a training step (saved activations, gradients, optimizer state)
            rather than inference.
        optimizer_states: optimizer buffers per parameter (1 for SGD momentum, 2 for Adam).

    Returns:
        A dict with ``parameters``, ``macs`` (multiply-accumulates of one forward of the batch),
        ``output_shapes``, and byte counts ``parameter_bytes``, ``gradient_bytes``,
        ``optimizer_bytes``, ``activation_bytes`` (kept for the backward pass, plus the loss's
        copy of the outputs), ``transient_bytes`` and ``total_bytes``.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (int(getattr(model, "in_channels", 1)), *shape)
    item = torch.empty((), dtype=dtype).element_size()
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * 4 for p in model.parameters())  # fp32 master weights
    meta = copy.deepcopy(model).to("meta").train(training)
    autocast = dtype in (torch.bfloat16, torch.float16)
    recorder = _Recorder(meta, _checkpoint_segments(meta) if training else {}, autocast=autocast)
    try:
        with torch.set_grad_enabled(training):
            out = meta(torch.empty((batch_size, *shape), device="meta"))
    finally:
        recorder.remove()
    outs = _outputs(out)
    out_numel = sum(t.numel() for t in outs)

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * (4 if id(t) in recorder.float32 else item)

    if training:
        kept = [nbytes(t) for t, seg in recorder.saved.values() if not seg]
        per_segment: dict[str, int] = {}
        for t, seg in recorder.saved.values():
            if seg:
                per_segment[seg] = per_segment.get(seg, 0) + nbytes(t)
        ckpt_bytes = 0
        if per_segment:  # boundaries stay; one segment is recomputed at a time in the backward
            kept_ids = {id(t) for t, seg in recorder.saved.values() if not seg}
            ckpt_bytes = sum(nbytes(t) for i, t in recorder.boundaries.items() if i not in kept_ids)
            ckpt_bytes += max(per_segment.values())
        activation_bytes = sum(kept) + ckpt_bytes + LOSS_COPIES_PER_OUTPUT * out_numel * item
        largest = max([nbytes(t) for t, _ in recorder.saved.values()] + [0])
        transient = BACKWARD_TRANSIENT_COPIES * largest
        grad_bytes, opt_bytes = param_bytes, optimizer_states * param_bytes
    else:
        activation_bytes = out_numel * item
        transient = 0
        grad_bytes = opt_bytes = 0
    return {
        "parameters": params,
        "macs": recorder.macs,
        "input_shape": (batch_size, *shape),
        "output_shapes": [tuple(t.shape) for t in outs],
        "dtype": str(dtype).replace("torch.", ""),
        "parameter_bytes": param_bytes,
        "gradient_bytes": grad_bytes,
        "optimizer_bytes": opt_bytes,
        "activation_bytes": activation_bytes,
        "transient_bytes": transient,
        "total_bytes": param_bytes + grad_bytes + opt_bytes + activation_bytes + transient,
    }


def estimate_training_memory_bytes(
    cfg: UNet3DConfig,
    in_channels: int,
    out_channels: int,
    strides: Sequence[Size3] | None,
    kernel_sizes: Sequence[Size3] | None,
    patch_size: Sequence[int],
    batch_size: int = 2,
    dtype: torch.dtype = torch.float32,
    optimizer_states: int = DEFAULT_OPTIMIZER_STATES,
) -> int:
    """Estimated peak memory in bytes of one training step of ``cfg``'s network at a patch size.

    Builds the network on the meta device (no allocation) and returns ``summary(...)["total_bytes"]``:
    weights, gradients, SGD momentum, kept activations, the loss's copies and backward transients.
    Allocator fragmentation and the CUDA context are not included; keep a margin.

    Args:
        cfg: architecture.
        in_channels: image channels.
        out_channels: classes.
        strides: per-stage strides from the plan.
        kernel_sizes: per-stage kernels from the plan.
        patch_size: (D, H, W), multiples of the total stride.
        batch_size: samples per step.
        dtype: activation dtype (bfloat16 under autocast).
        optimizer_states: buffers the optimizer keeps per parameter (SGD momentum 1, AdamW 2).
    """
    with torch.device("meta"):
        model = build_model(cfg, in_channels, out_channels, strides, kernel_sizes)
    report = summary(model, (in_channels, *patch_size), batch_size, dtype, True, optimizer_states)
    return int(report["total_bytes"])


__all__ = ["estimate_training_memory_bytes", "summary"]
