"""Whole-volume prediction: Gaussian-weighted sliding windows, mirroring TTA and model averaging.

This module owns :func:`predict_probabilities`, which turns one preprocessed image (C, X, Y, Z)
into class probabilities (K, X, Y, Z) on the same grid: sliding windows with a Gaussian blend of
overlapping windows (the scheme of MONAI's ``sliding_window_inference``, which the tests hold it to;
written here so that inference needs no MONAI import), several windows per forward, autocast (bf16
where the GPU supports it, else fp16) on CUDA and bf16 on CPUs with native bf16 instructions,
optional mirroring test-time augmentation over any subset of the three spatial axes, and the
softmax averaged over every flip and every model. When the GPU runs out of memory the same
prediction is retried with the stitching buffer on the CPU (windows still run on the GPU, one per
forward); that fallback happens only for ``torch.OutOfMemoryError`` and is recorded in the
caller's warnings list. Any other error propagates unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medgn.environment import cpu_bf16_supported, cuda_bf16_supported
from medgn.errors import ResourceError, UsageError
from medgn.infer.config import distinct_spatial_axes

__all__ = ["PRECISIONS", "WindowSettings", "mirror_flips", "predict_probabilities"]

PRECISIONS = ("auto", "bf16", "fp32")
# What "auto" resolves to, as a sidecar records it: fp16 is autocast on a GPU without native bf16.
RESOLVED_PRECISIONS = (*PRECISIONS, "fp16")


@dataclass(frozen=True)
class WindowSettings:
    """How the sliding window covers a volume.

    Attributes:
        roi_size: window size in voxels along (X, Y, Z) of the preprocessed array (the plan's
            patch size).
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        sw_batch_size: windows per forward pass.
        tta: average over mirrored copies of the input.
        mirror_axes: spatial axes (0, 1, 2) that TTA mirrors; all 2**len combinations are used.
        sigma_scale: Gaussian sigma as a fraction of the window; 0.125 is nnU-Net's and MONAI's
            choice (the window border gets ~1e-3 of the centre's weight).
        precision: "auto" (bf16 autocast on GPUs with bf16, fp16 on older GPUs, bf16 on CPUs with
            native bf16 instructions, else fp32), "bf16" or "fp32". Stitching and softmax stay fp32.
    """

    roi_size: tuple[int, int, int]
    overlap: float = 0.5
    sw_batch_size: int = 2
    tta: bool = False
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    sigma_scale: float = 0.125
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.precision not in RESOLVED_PRECISIONS:
            raise UsageError("--precision", "unknown precision", got=self.precision, expected=" or ".join(PRECISIONS))
        if not 0.0 <= self.overlap < 1.0:
            raise UsageError("--overlap", "overlap out of range", got=self.overlap, expected="a fraction in [0, 1)")
        if self.sw_batch_size < 1:
            raise UsageError(
                "--sw-batch-size", "needs at least one window per forward", got=self.sw_batch_size, expected=">= 1"
            )
        if len(self.roi_size) != 3 or any(int(s) < 1 for s in self.roi_size):
            raise UsageError("patch_size", "window size must be 3 positive integers", got=list(self.roi_size))
        if not distinct_spatial_axes(self.mirror_axes):
            raise UsageError(
                "mirror_axes",
                "mirror axes must be distinct spatial axes",
                got=list(self.mirror_axes),
                expected="a subset of (0, 1, 2)",
            )


def mirror_flips(settings: WindowSettings) -> list[tuple[int, ...]]:
    """The flips to average: ``[()]`` without TTA, else every subset of ``mirror_axes``.

    Returns:
        Tuples of tensor dims to flip in a (B, C, X, Y, Z) batch (spatial axis a is dim a + 2).
    """
    if not settings.tta:
        return [()]
    dims = [a + 2 for a in settings.mirror_axes]
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """What ``precision`` means on ``device``: "bf16", "fp32", or "fp16" (autocast on a GPU without bf16).

    Recorded in sidecars, so a mask says which arithmetic made it.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_bf16_supported(device) else "fp16"
    return "bf16" if device.type == "cpu" and cpu_bf16_supported() else "fp32"


def autocast_for(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager[None]:
    """The autocast context a forward pass runs in on ``device`` for ``precision`` (see WindowSettings)."""
    resolved = resolve_precision(device, precision)
    if device.type == "cuda" and resolved != "fp32":
        # bf16 keeps fp32's exponent range (no overflow in deep layers); fp16 only on older GPUs.
        return torch.autocast("cuda", dtype=torch.bfloat16 if resolved == "bf16" else torch.float16)
    if device.type == "cpu" and resolved == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _cpu_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    if device.type != "cpu" or threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """First voxels of the windows along one axis: a step of ``int(roi * (1 - overlap))``, the last flush.

    An axis no longer than the window gets one window (the image is padded to the window first).
    """
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1.0 - overlap)))
    count = next(d for d in range(math.ceil(size / step) + 1) if d * step + roi >= size) + 1
    return [min(i * step, size - roi) for i in range(count)]


def gaussian_weights(roi: Sequence[int], sigma_scale: float) -> torch.Tensor:
    """(X, Y, Z) blending weights: a Gaussian of sigma ``roi * sigma_scale`` centred on the window.

    Unnormalised (the stitched sum is divided by the summed weights); weights below 1e-3 are raised
    to 1e-3, so every voxel of a window counts.
    """
    weights: torch.Tensor | None = None
    for i, n in enumerate(int(s) for s in roi):
        x = torch.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=torch.float32)[:n]
        g = torch.exp(x**2 / (-2 * (n * sigma_scale) ** 2))
        weights = g if weights is None else weights.unsqueeze(-1) * g[(None,) * i]
    assert weights is not None
    return weights.clamp_(min=max(float(weights.min()), 1e-3))


def _window_logits(
    model: nn.Module,
    batch: torch.Tensor,
    settings: WindowSettings,
    sw_device: torch.device,
    stitch_device: torch.device,
    sw_batch_size: int,
) -> torch.Tensor:
    """Stitched logits (1, K, X, Y, Z) on ``stitch_device`` for one (1, C, X, Y, Z) batch.

    The image is zero-padded (evenly on both sides) where it is smaller than the window; windows
    step by ``int(roi * (1 - overlap))`` with the last one flush with the far side; every window's
    logits are weighted by :func:`gaussian_weights` and the sum is divided by the summed weights.
    """
    roi = [int(s) for s in settings.roi_size]
    size_in = [int(s) for s in batch.shape[2:]]
    pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, size_in)]
    if any(p for pair in pads for p in pair):
        batch = F.pad(batch, [p for pair in reversed(pads) for p in pair], mode="constant", value=0.0)
    size = [int(s) for s in batch.shape[2:]]
    starts = list(itertools.product(*(window_starts(n, r, settings.overlap) for n, r in zip(size, roi))))
    weights = gaussian_weights(roi, settings.sigma_scale).to(sw_device)
    batch = batch.to(stitch_device)
    total: torch.Tensor | None = None
    count = torch.zeros((1, 1, *size), dtype=torch.float32, device=stitch_device)
    weights_out = weights.to(stitch_device)
    for first in range(0, len(starts), sw_batch_size):
        group = starts[first : first + sw_batch_size]
        regions = [tuple(slice(a, a + r) for a, r in zip(start, roi)) for start in group]
        windows = torch.cat([batch[(slice(None), slice(None), *region)] for region in regions]).to(sw_device)
        with autocast_for(sw_device, settings.precision):
            out = model(windows)
        if isinstance(out, (list, tuple)):  # deep-supervision models in eval mode: full resolution first
            out = out[0]
        out = (out.float() * weights).to(stitch_device)
        if total is None:
            total = torch.zeros((1, int(out.shape[1]), *size), dtype=torch.float32, device=stitch_device)
        for i, region in enumerate(regions):
            total[(slice(None), slice(None), *region)] += out[i : i + 1]
            count[(slice(None), slice(None), *region)] += weights_out
    assert total is not None  # at least one window
    total /= count
    keep = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, size_in))
    return total[(slice(None), slice(None), *keep)]


def _flip_probabilities(
    model: nn.Module,
    flipped: torch.Tensor,
    dims: tuple[int, ...],
    settings: WindowSettings,
    sw_device: torch.device,
    stitch_device: torch.device,
    sw_batch_size: int,
) -> torch.Tensor:
    """(K, X, Y, Z) probabilities on the CPU of one mirrored copy, mirrored back: the softmax and the
    flip allocate full volumes too, so an out-of-memory there takes the same fallback."""
    logits = _window_logits(model, flipped, settings, sw_device, stitch_device, sw_batch_size)
    probs = torch.softmax(logits.float(), dim=1)  # (1, K, X, Y, Z)
    del logits
    if dims:
        probs = torch.flip(probs, dims)
    return probs[0].cpu()


def _oom_error(device: str | torch.device, exc: BaseException) -> ResourceError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ResourceError(
        str(device),
        "out of memory even with stitching on the CPU and one window per forward",
        got=first,
        expected="a smaller patch size or more memory",
    )


def _cpu_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


@torch.inference_mode()
def predict_probabilities(
    models: Sequence[nn.Module],
    image: torch.Tensor,
    settings: WindowSettings,
    *,
    device: str | torch.device = "cpu",
    warnings: list[str] | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """Class probabilities for one preprocessed image, averaged over TTA flips and models.

    Args:
        models: networks in eval mode on ``device``, each mapping (B, C, *roi) to logits (B, K, *roi).
        image: (C, X, Y, Z) float image on any device.
        settings: window size, overlap, windows per forward, TTA.
        device: where the windows run ("cpu" or "cuda[:i]").
        warnings: list that receives a line when the CPU-stitching fallback was used.
        threads: CPU threads for inference on the CPU (None keeps torch's setting).

    Returns:
        (K, X, Y, Z) float32 probabilities on the CPU; every voxel sums to 1.

    Raises:
        ResourceError: out of memory even with stitching on the CPU (exit 5).
    """
    if not models:
        raise UsageError("--model", "no model given", expected="at least one checkpoint or run folder")
    if image.ndim != 4:
        raise UsageError(
            "image", "expected a channel-first 3D image", got=f"shape {tuple(image.shape)}", expected="(C, X, Y, Z)"
        )
    sw_device = torch.device(device)
    # Stitch where the windows run while that fits; the fallback moves the buffer to the CPU.
    stitch_device = sw_device
    sw_batch_size = settings.sw_batch_size
    batch = image.float().unsqueeze(0)  # (1, C, X, Y, Z)
    total: torch.Tensor | None = None
    count = 0
    flips = mirror_flips(settings)
    with _cpu_threads(sw_device, threads):
        for model in models:
            for dims in flips:
                flipped = torch.flip(batch, dims) if dims else batch
                failed = False
                try:
                    probs = _flip_probabilities(model, flipped, dims, settings, sw_device, stitch_device, sw_batch_size)
                except torch.OutOfMemoryError as exc:
                    if stitch_device.type == "cpu" and sw_batch_size == 1:
                        raise _oom_error(device, exc) from exc
                    failed = True  # retried below, once this block has let go of the failed attempt's tensors
                except (MemoryError, RuntimeError) as exc:
                    # The CPU allocator raises RuntimeError ("can't allocate memory"): nothing smaller to
                    # fall back to there; the patch or the scan is too large for this machine.
                    if not _cpu_out_of_memory(exc):
                        raise
                    raise _oom_error(device, exc) from exc
                if failed:
                    if sw_device.type == "cuda":
                        torch.cuda.empty_cache()
                    stitch_device, sw_batch_size = torch.device("cpu"), 1
                    if warnings is not None:
                        warnings.append(
                            f"out of memory on {device}: stitching moved to the CPU with one window per forward"
                        )
                    try:
                        probs = _flip_probabilities(
                            model, flipped, dims, settings, sw_device, stitch_device, sw_batch_size
                        )
                    except torch.OutOfMemoryError as again:
                        raise _oom_error(device, again) from again
                total = probs if total is None else total.add_(probs)
                count += 1
    assert total is not None  # at least one model and one flip ran
    return total.div_(count)
