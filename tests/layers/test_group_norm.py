"""The GroupNorm layer (drop-in for nn.GroupNorm) and the group-count rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medgn.layers.group_norm import GroupNorm
from medgn.layers.group_rule import DEFAULT_CHANNELS_PER_GROUP, num_groups_for, resolve_groups


def _trained_reference(groups: int, channels: int) -> nn.GroupNorm:
    ref = nn.GroupNorm(groups, channels)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(channels, generator=gen))
        ref.bias.copy_(torch.randn(channels, generator=gen))
    return ref


def test_same_parameters_init_and_state_dict_keys() -> None:
    ours, ref = GroupNorm(4, 16), nn.GroupNorm(4, 16)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    assert torch.equal(ours.weight, torch.ones(16)) and torch.equal(ours.bias, torch.zeros(16))
    assert isinstance(ours, nn.GroupNorm)
    assert repr(ours) == repr(ref)
    no_affine = GroupNorm(4, 16, affine=False)
    assert no_affine.weight is None and list(no_affine.state_dict()) == []


@pytest.mark.parametrize("base_takes_bias", [True, False])
def test_builds_on_torch_without_the_bias_keyword(monkeypatch: pytest.MonkeyPatch, base_takes_bias: bool) -> None:
    """torch 2.10/2.11's nn.GroupNorm has no ``bias`` keyword: the layer must still build."""
    import medgn.layers.group_norm as module

    original = nn.GroupNorm.__init__

    def old_init(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None):  # noqa: ANN001, ANN202
        original(self, num_groups, num_channels, eps, affine, device=device, dtype=dtype)

    if not base_takes_bias:
        monkeypatch.setattr(nn.GroupNorm, "__init__", old_init)
    monkeypatch.setattr(module, "_BASE_TAKES_BIAS", base_takes_bias)
    with_bias, without = GroupNorm(4, 16, activation="relu"), GroupNorm(4, 16, bias=False)
    assert list(with_bias.state_dict()) == ["weight", "bias"] and torch.equal(with_bias.bias, torch.zeros(16))
    assert without.bias is None and list(without.state_dict()) == ["weight"]
    x = torch.randn(2, 16, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(without(x), F.group_norm(x, 4, without.weight, None), rtol=1e-5, atol=1e-5)


def test_extra_repr_names_activation_and_backend() -> None:
    text = repr(GroupNorm(2, 8, activation="leaky_relu", negative_slope=0.2, backend="torch"))
    assert "GroupNorm(2, 8, eps=1e-05" in text and "activation=leaky_relu" in text
    assert "negative_slope=0.2" in text and "backend=torch" in text


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loads_nn_groupnorm_state_dict_and_matches(backend: str) -> None:
    ref = _trained_reference(4, 16)
    ours = GroupNorm(4, 16, activation="silu", backend=backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 16, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    res = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), F.silu(ref(x)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x, res), F.silu(ref(x) + res), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trips_back_to_nn_groupnorm() -> None:
    ours = GroupNorm(2, 8, activation="relu")
    with torch.no_grad():
        ours.weight.mul_(3.0)
    ref = nn.GroupNorm(2, 8)
    ref.load_state_dict(ours.state_dict())
    assert torch.equal(ref.weight, ours.weight)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="unknown activation"):
        GroupNorm(2, 8, activation="tanh")
    with pytest.raises(ValueError, match="unknown backend"):
        GroupNorm(2, 8, backend="cuda")
    with pytest.raises(ValueError):
        GroupNorm(3, 8)  # nn.GroupNorm's own divisibility check
    with pytest.raises(ValueError, match="wrong channel count"):
        GroupNorm(2, 8)(torch.randn(1, 4, 3, 3))


@pytest.mark.parametrize(
    ("channels", "expected"),
    [
        (1, 1),
        (16, 1),
        (32, 2),
        (48, 3),
        (64, 4),
        (100, 5),
        (320, 20),
        (512, 32),
        (520, 26),
        (2048, 32),
    ],
)
def test_group_rule(channels: int, expected: int) -> None:
    # The paper's rule (16 channels per group at narrow layers) as a setting of medgn's rule.
    groups = num_groups_for(channels, min_channels_per_group=16)
    assert groups == expected and channels % groups == 0


@pytest.mark.parametrize(
    ("channels", "expected"), [(1, 1), (8, 8), (16, 16), (24, 24), (48, 24), (100, 25), (128, 32), (320, 32)]
)
def test_group_rule_default(channels: int, expected: int) -> None:
    assert DEFAULT_CHANNELS_PER_GROUP == 1  # chosen by the LA2018 study (README, "Group rule")
    assert num_groups_for(channels) == expected and resolve_groups(channels) == expected


def test_group_rule_extremes_and_errors() -> None:
    assert num_groups_for(64, max_groups=1) == 1  # LayerNorm
    assert num_groups_for(24, max_groups=24, min_channels_per_group=1) == 24  # InstanceNorm
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            num_groups_for(bad)  # type: ignore[arg-type]
