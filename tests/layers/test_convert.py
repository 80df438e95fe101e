"""convert_norm: every BatchNorm/InstanceNorm becomes GroupNorm, affine kept, MONAI models work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medgn.errors import UsageError
from medgn.layers import GroupNorm, convert_norm
from medgn.layers.convert import CONVERTIBLE, groups_for_width

monai_nets = pytest.importorskip("monai.networks.nets")


def _count(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_every_norm_kind_is_replaced_with_affine_copied() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 64, 1),
        nn.BatchNorm3d(64),
        nn.Sequential(nn.InstanceNorm3d(64, affine=True), nn.InstanceNorm3d(64)),
    )
    head = nn.ModuleDict({"bn1": nn.BatchNorm1d(48), "bn2": nn.BatchNorm2d(24)})
    model.append(head)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    old_weight = model[1].weight.detach().clone()
    converted, replaced = convert_norm(model, num_groups=32)
    assert converted is model
    assert [r.name for r in replaced] == ["1", "2.0", "2.1", "3.bn1", "3.bn2"]
    assert _count(model, CONVERTIBLE) == 0 and _count(model, GroupNorm) == 5
    torch.testing.assert_close(model[1].weight, old_weight)
    assert [r.copied_affine for r in replaced] == [True, True, False, True, True]
    assert model[2][1].weight is None  # InstanceNorm without affine stays without
    # widths kept; group count: largest divisor of the width not above 32
    assert [(m.num_groups, m.num_channels) for m in model.modules() if isinstance(m, GroupNorm)] == [
        (32, 64), (32, 64), (32, 64), (24, 48), (24, 24)
    ]  # fmt: skip
    assert str(replaced[0]) == "1: BatchNorm3d(64) -> GroupNorm(32, 64)"


def test_instance_norm_converted_with_one_channel_per_group_keeps_the_function() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.InstanceNorm3d(6, affine=True)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    x = torch.randn(2, 2, 4, 5, 3, dtype=torch.float64)
    expected = model(x)
    converted, replaced = convert_norm(model, to="group", num_groups=6)  # G = C is InstanceNorm
    assert len(replaced) == 1
    torch.testing.assert_close(converted(x), expected, rtol=1e-10, atol=1e-10)


def test_a_norm_given_alone_is_returned_replaced_and_group_torch_target() -> None:
    converted, replaced = convert_norm(nn.BatchNorm3d(16), to="group_torch", num_groups=None)
    assert type(converted) is nn.GroupNorm and converted.num_groups == 16  # rule: 16 channels, 16 groups
    assert replaced[0].name == ""


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_monai_segresnet(norm: str) -> None:
    torch.manual_seed(2)
    model = monai_nets.SegResNet(
        spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, norm=norm, blocks_down=(1, 2), blocks_up=(1,)
    )
    before = _count(model, CONVERTIBLE)
    assert before > 0
    model, replaced = convert_norm(model, num_groups=4)
    assert len(replaced) == before and _count(model, CONVERTIBLE) == 0
    out = model(torch.randn(1, 1, 16, 16, 16))
    assert out.shape == (1, 2, 16, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_monai_unet(norm: str) -> None:
    torch.manual_seed(3)
    model = monai_nets.UNet(
        spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm=norm
    )
    before = _count(model, CONVERTIBLE)
    model, replaced = convert_norm(model, num_groups=32)
    assert len(replaced) == before > 0 and _count(model, CONVERTIBLE) == 0
    assert all(isinstance(model.get_submodule(r.name), GroupNorm) for r in replaced)
    out = model(torch.randn(2, 1, 16, 16, 16))
    out.float().mean().backward()
    assert out.shape == (2, 2, 16, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("width", "wanted", "groups"), [(64, 32, 32), (48, 32, 24), (10, 32, 10), (7, 4, 1), (320, 32, 32)]
)
def test_groups_for_width(width: int, wanted: int, groups: int) -> None:
    assert groups_for_width(width, wanted) == groups


def test_bad_target_and_group_count() -> None:
    with pytest.raises(UsageError, match="'group_torch'"):
        convert_norm(nn.BatchNorm3d(4), to="layer")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="num_groups"):
        convert_norm(nn.BatchNorm3d(4), num_groups=0)
