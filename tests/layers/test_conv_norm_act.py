"""ConvNormAct3d, ResidualBlock3d and WSConv3d against float64 functional references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medgn.errors import UsageError
from medgn.layers import ConvNormAct3d, GroupNorm, ResidualBlock3d, WSConv3d, standardize_weight


def _randomise_affine(module: nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("norm.bias"):
                p.uniform_(-0.5, 0.5)


def _reference(block: ConvNormAct3d, x: torch.Tensor, residual: torch.Tensor | None, groups: int) -> torch.Tensor:
    conv = block.conv
    y = F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    y = F.group_norm(y, groups, block.norm.weight, block.norm.bias, 1e-5)
    if residual is not None:
        y = y + residual
    return F.leaky_relu(y, 0.01)


@pytest.mark.parametrize(
    ("kernel", "stride", "size", "out_size"),
    [(3, 1, (7, 9, 5), (7, 9, 5)), ((1, 3, 3), (1, 2, 2), (5, 9, 8), (5, 5, 4)), (3, 2, (9, 9, 9), (5, 5, 5))],
)
def test_conv_norm_act_shapes(kernel, stride, size, out_size) -> None:
    block = ConvNormAct3d(2, 32, kernel, stride)
    assert block(torch.randn(1, 2, *size)).shape == (1, 32, *out_size)


@pytest.mark.parametrize("norm", ["group", "group_torch"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_conv_norm_act_matches_functional_reference(norm: str, with_residual: bool) -> None:
    torch.manual_seed(1)
    block = ConvNormAct3d(3, 32, 3, 1, norm=norm).double()
    _randomise_affine(block)
    assert block.fused is (norm == "group")
    assert isinstance(block.norm, GroupNorm) is (norm == "group")
    x = torch.randn(2, 3, 5, 6, 4, dtype=torch.float64)
    r = torch.randn(2, 32, 5, 6, 4, dtype=torch.float64) if with_residual else None
    torch.testing.assert_close(block(x, residual=r), _reference(block, x, r, groups=32), rtol=1e-10, atol=1e-10)


def test_state_dict_keys_are_the_same_for_every_norm_with_affine() -> None:
    keys = {norm: sorted(ConvNormAct3d(2, 16, norm=norm).state_dict()) for norm in ("group", "group_torch", "layer")}
    assert keys["group"] == keys["group_torch"] == keys["layer"] == ["conv.weight", "norm.bias", "norm.weight"]
    assert "conv.bias" in ConvNormAct3d(2, 16, norm="none").state_dict()


@pytest.mark.parametrize(("in_ch", "stride", "projected"), [(16, 1, False), (8, 1, True), (16, (1, 2, 2), True)])
@pytest.mark.parametrize("norm", ["group", "batch"])
def test_residual_block_matches_reference(in_ch: int, stride, projected: bool, norm: str) -> None:
    torch.manual_seed(2)
    block = ResidualBlock3d(in_ch, 16, 3, stride, norm=norm).double().eval()
    assert isinstance(block.skip, ConvNormAct3d) is projected
    x = torch.randn(1, in_ch, 4, 6, 6, dtype=torch.float64)
    h = block.conv1(x)
    skip = block.skip(x)
    if norm == "group":  # 16 channels: the rule gives 16 groups; the fused act is rebuilt below
        y2 = F.group_norm(block.conv2.conv(h), 16, block.conv2.norm.weight, block.conv2.norm.bias, 1e-5)
    else:
        y2 = block.conv2.norm(block.conv2.conv(h))
    expected = F.leaky_relu(y2 + skip, 0.01)
    out = block(x)
    assert out.shape == (1, 16, 4, 3 if stride != 1 else 6, 3 if stride != 1 else 6)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_weight_standardized_conv_matches_reference() -> None:
    torch.manual_seed(3)
    conv = WSConv3d(3, 5, 3, padding=1, bias=True).double()
    w = conv.weight.detach().flatten(1)
    w_std = ((w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, unbiased=False, keepdim=True) + 1e-5)).view_as(
        conv.weight
    )
    std = standardize_weight(conv.weight)
    torch.testing.assert_close(std.flatten(1).mean(1), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.randn(1, 3, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(conv(x), F.conv3d(x, w_std, conv.bias, padding=1))
    block = ConvNormAct3d(3, 16, weight_std=True)
    assert isinstance(block.conv, WSConv3d)
    assert sorted(block.state_dict()) == ["conv.weight", "norm.bias", "norm.weight"]


@pytest.mark.parametrize(
    ("kwargs", "key"), [({"kernel_size": (3, 3)}, "kernel_size"), ({"stride": 0}, "stride"), ({"norm": "bn"}, "norm")]
)
def test_bad_block_arguments_are_usage_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(UsageError, match=key):
        ConvNormAct3d(2, 16, **kwargs)
