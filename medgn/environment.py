"""What this machine offers medgn: library versions, CPU threads, CUDA devices, GroupNorm backend.

Used by ``medgn env`` and recorded in checkpoints and provenance sidecars. Finding out whether
triton is installed uses package metadata, never an import, so asking does not load triton.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Any

# torchrun's rendezvous variables: with RANK and WORLD_SIZE, what its env:// rendezvous reads.
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")
_PACKAGES = ("torch", "monai", "nibabel", "SimpleITK", "numpy", "triton")


def package_version(name: str) -> str | None:
    """Installed version of distribution ``name``, or None when absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of Python, medgn and its key libraries (JSON-able)."""
    import medgn

    result: dict[str, str | None] = {"python": platform.python_version(), "medgn": medgn.__version__}
    for name in _PACKAGES:
        result[name.lower()] = package_version(name)
    return result


def triton_available() -> bool:
    """True when triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def cuda_devices() -> list[dict[str, Any]]:
    """Name, memory and compute capability of each visible CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(
            {
                "index": index,
                "name": props.name,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
                "bf16": cuda_bf16_supported(index),
            }
        )
    return devices


def cuda_bf16_supported(device: Any = None) -> bool:
    """Whether a GPU computes bf16 natively: compute capability 8.0 or newer (A100, H100, RTX 30xx on).

    ``torch.cuda.is_bf16_supported()`` also counts emulation, so it says True on a V100 or T4, where
    bf16 is slow and cuDNN has no bf16 3D convolutions; and it asks about the current device, not
    ``device`` (a torch.device, "cuda:1", an index, or None: the current one).
    """
    import torch

    if not torch.cuda.is_available():
        return False
    index = torch.device(device).index if isinstance(device, (torch.device, str)) else device
    return torch.cuda.get_device_capability(index) >= (8, 0)


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), so CPU autocast pays off.

    Without these instructions oneDNN emulates bf16 and a 3D U-Net step is slower than in fp32, so
    ``amp: auto`` stays in fp32 there. ``MEDGN_CPU_BF16=0`` or ``=1`` overrides the detection.
    """
    forced = os.environ.get("MEDGN_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name)()) for name in probes if hasattr(torch.cpu, name))


def group_norm_backend(device_type: str) -> str:
    """The backend ``medgn.ops.group_norm(..., backend="auto")`` picks for tensors on ``device_type``."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cuda" and triton_available():
        return "triton"
    if device_type == "cpu" and interpret and triton_available():
        return "torch (triton interpreter available with backend='triton')"
    return "torch"


def describe() -> dict[str, Any]:
    """Everything ``medgn env`` prints, as a JSON-able mapping."""
    import torch

    devices = cuda_devices()
    return {
        "versions": versions(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "cpu_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_bf16_supported(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda,
        "cuda_devices": devices,
        "group_norm_backend": {
            "cpu": group_norm_backend("cpu"),
            "cuda": group_norm_backend("cuda") if devices else "no CUDA device",
        },
    }


def local_rank() -> int | None:
    """torchrun's ``LOCAL_RANK`` (None outside torchrun): the one place medgn reads it.

    Raises:
        UsageError: the variable is set but not an integer.
    """
    from medgn.errors import UsageError

    raw = os.environ.get("LOCAL_RANK")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(
            "LOCAL_RANK", "environment variable is not an integer", got=raw, expected="an integer set by torchrun"
        ) from None


def resolve_device(device: Any) -> Any:
    """The torch device for ``cpu``, ``cuda`` or ``cuda:N``: the one device rule of train and infer.

    Plain ``cuda`` under torchrun means this process's GPU, ``cuda:$LOCAL_RANK``. Asking whether
    CUDA is available does not initialise it.

    Raises:
        UsageError: an unknown device, or CUDA asked for where there is none (exit 2).
    """
    import torch

    from medgn.errors import UsageError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError("--device", "unknown device", got=str(device), expected="cpu, cuda or cuda:N") from exc
    if dev.type not in ("cpu", "cuda"):
        raise UsageError("--device", "unsupported device", got=str(device), expected="cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                "--device", "CUDA requested but no CUDA device is available", got=str(device), expected="--device cpu"
            )
        rank = local_rank()
        if dev.index is None and rank is not None:
            dev = torch.device("cuda", rank)
    return dev
