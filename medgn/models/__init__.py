"""medgn.models: the 3D U-Net, its configuration dataclass, the model registry and its summary."""

from medgn.models.config import UNet3DConfig
from medgn.models.registry import build_model, get_model, model_names, register_model
from medgn.models.summary import estimate_training_memory_bytes, summary
from medgn.models.unet import UNet3D

__all__ = [
    "UNet3D",
    "UNet3DConfig",
    "build_model",
    "estimate_training_memory_bytes",
    "get_model",
    "model_names",
    "register_model",
    "summary",
]
