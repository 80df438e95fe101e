"""medgn.models: the 3D U-Net, its configuration dataclass, the model registry and its summary.

The names below load on first use (PEP 562), so ``medgn.models.config`` imports without torch: the
command-line parser and the inference config read its choices without loading the network code.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "UNet3D": "medgn.models.unet",
    "UNet3DConfig": "medgn.models.config",
    "build_model": "medgn.models.registry",
    "estimate_training_memory_bytes": "medgn.models.summary",
    "get_model": "medgn.models.registry",
    "model_names": "medgn.models.registry",
    "register_model": "medgn.models.registry",
    "summary": "medgn.models.summary",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = sorted(_HOMES)
