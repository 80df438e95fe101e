"""Norm and activation factories: names, group-count rule, fused activation, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medgn.errors import UsageError
from medgn.layers import GroupNorm, convert_norm, fuses_activation, make_activation, make_norm
from medgn.layers.group_rule import num_groups_for

REFERENCE_ACTS = {
    "relu": F.relu,
    "leaky_relu": lambda t: F.leaky_relu(t, 0.01),
    "silu": F.silu,
    "gelu": F.gelu,
}


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("group", GroupNorm),
        ("group_torch", nn.GroupNorm),
        ("batch", nn.BatchNorm3d),
        ("instance", nn.InstanceNorm3d),
        ("layer", GroupNorm),
        ("none", nn.Identity),
    ],
)
def test_make_norm_builds_each_name(name: str, cls: type) -> None:
    layer = make_norm(name, 32)
    assert type(layer) is cls


@pytest.mark.parametrize(
    ("channels", "groups"), [(8, 2), (16, 4), (32, 8), (48, 12), (64, 16), (320, 32), (512, 32), (1024, 32)]
)
def test_group_rule_at_narrow_layers(channels: int, groups: int) -> None:
    # 32 groups, but at least 4 channels per group at narrow layers; the default rule is num_groups_for.
    assert make_norm("group", channels, group_channels=4).num_groups == groups
    assert make_norm("group_torch", channels, group_channels=4).num_groups == groups
    assert make_norm("group", channels).num_groups == num_groups_for(channels)
    # The paper's 16 channels per group turns a 16-channel layer into LayerNorm (G = 1).
    assert make_norm("group", 16, group_channels=16).num_groups == 1


def test_layer_norm_is_one_group_and_explicit_groups_are_kept() -> None:
    assert make_norm("layer", 64).num_groups == 1
    assert make_norm("group", 64, num_groups=8).num_groups == 8


@pytest.mark.parametrize("act", sorted(REFERENCE_ACTS))
def test_group_norm_fuses_activation_and_matches_float64_reference(act: str) -> None:
    torch.manual_seed(0)
    layer = make_norm("group", 32, activation=act).double()
    assert isinstance(layer, GroupNorm) and fuses_activation("group")
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 32, 3, 5, 4, dtype=torch.float64)
    expected = REFERENCE_ACTS[act](F.group_norm(x, 32, layer.weight, layer.bias, 1e-5))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_non_fusing_norm_with_activation_is_norm_then_activation() -> None:
    layer = make_norm("batch", 6, activation="relu")
    assert isinstance(layer, nn.Sequential)
    assert isinstance(layer[0], nn.BatchNorm3d) and isinstance(layer[1], nn.ReLU)
    assert not fuses_activation("batch")


@pytest.mark.parametrize("act", sorted(REFERENCE_ACTS))
def test_make_activation_matches_functional(act: str) -> None:
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    torch.testing.assert_close(make_activation(act)(x), REFERENCE_ACTS[act](x))


def test_make_activation_none_is_identity() -> None:
    assert isinstance(make_activation(None), nn.Identity)
    assert isinstance(make_activation("none"), nn.Identity)


@pytest.mark.parametrize(
    ("call", "valid"),
    [
        (lambda: make_norm("bn", 8), "'group_torch'"),
        (lambda: make_norm("group", 8, activation="tanh"), "'leaky_relu'"),
        (lambda: make_activation("swish"), "'silu'"),
        (lambda: fuses_activation("gn"), "'instance'"),
    ],
)
def test_unknown_names_list_the_valid_ones(call, valid: str) -> None:
    with pytest.raises(UsageError, match=valid):
        call()


def test_groups_not_dividing_channels_become_the_largest_divisor_below() -> None:
    # The same rule as convert_norm: 5 groups of 24 channels is impossible, 4 is the nearest below.
    assert make_norm("group", 24, num_groups=5).num_groups == 4
    assert convert_norm(nn.BatchNorm3d(24), to="group", num_groups=5)[0].num_groups == 4
    with pytest.raises(UsageError, match="num_groups"):
        make_norm("group", 24, num_groups=0)


def test_a_fixed_group_count_that_does_not_divide_a_width_is_changed_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from medgn.layers.group_rule import _note_other_groups, resolve_groups

    _note_other_groups.cache_clear()
    with caplog.at_level("INFO", logger="medgn.layers.group_rule"):
        assert resolve_groups(20, num_groups=3) == 2  # 3 does not divide 20: the largest divisor below
        assert resolve_groups(20, num_groups=3) == 2  # logged once per width and count
        assert resolve_groups(24, num_groups=3) == 3  # divides: nothing to say
    notes = [r.getMessage() for r in caplog.records if r.name == "medgn.layers.group_rule"]
    assert notes == ["num_groups=3: a 20-channel layer takes 2 groups (the largest divisor of 20 not above 3)"]
