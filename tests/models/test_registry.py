"""UNet3DConfig validation and the model registry."""

from __future__ import annotations

import pytest
import torch

from medgn.configtools import build
from medgn.errors import UsageError
from medgn.layers import ResidualBlock3d
from medgn.models import UNet3D, UNet3DConfig, build_model, get_model, model_names, register_model


def test_build_model_from_a_yaml_like_mapping() -> None:
    cfg = build(
        UNet3DConfig, {"features": [4, 8, 16], "norm": "group_torch", "deep_supervision": False}, prefix="model"
    )
    assert cfg.features == (4, 8, 16)
    net = build_model(cfg, 2, 4, strides=[1, (1, 2, 2), 2], kernel_sizes=[(1, 3, 3), 3, 3])
    assert isinstance(net, UNet3D) and net.total_stride == (2, 4, 4)
    assert net.train()(torch.randn(1, 2, 4, 8, 8)).shape == (1, 4, 4, 8, 8)


def test_residual_name_forces_residual_stages() -> None:
    cfg = UNet3DConfig(name="unet3d_residual", features=(4, 8, 16))
    assert not cfg.residual
    net = build_model(cfg, 1, 2)
    assert any(isinstance(m, ResidualBlock3d) for m in net.modules())
    assert not any(isinstance(m, ResidualBlock3d) for m in build_model(UNet3DConfig(features=(4, 8)), 1, 2).modules())


def test_registry_names_and_unknown_name() -> None:
    assert {"unet3d", "unet3d_residual"} <= set(model_names())
    with pytest.raises(UsageError, match="model.name.*'unet3d', 'unet3d_residual'"):
        get_model("resunet")


def test_register_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("unet3d")(lambda *a: None)  # type: ignore[arg-type, return-value]


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"norm": "bn"}, "model.norm"),
        ({"activation": "swish"}, "model.activation"),
        ({"n_conv_per_stage": 0}, "model.n_conv_per_stage"),
        ({"num_groups": 0}, "model.num_groups"),
        ({"features": [32]}, "model"),
        ({"strides": [1, 2]}, "model.strides"),  # strides come from the plan, not the config
    ],
)
def test_config_errors_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(UsageError, match=key):
        build(UNet3DConfig, data, prefix="model")
