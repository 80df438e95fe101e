"""The group-count rule for GroupNorm layers: how many groups a layer of C channels gets.

Wu & He (ECCV 2018) use G = 32 groups; a narrow layer (C < 32 x 16) would then have fewer than 16
channels per group, so it gets C // 16 groups instead (at least 1), always a divisor of C.
The two ends of the family are valid too: G = 1 normalises all channels together (LayerNorm over
C x spatial) and G = C normalises each channel alone (InstanceNorm).
"""

from __future__ import annotations

from medgn.errors import UsageError

__all__ = ["groups_for_width", "num_groups_for"]


def num_groups_for(channels: int, max_groups: int = 32, min_channels_per_group: int = 16) -> int:
    """Number of GroupNorm groups for a layer with ``channels`` channels.

    ``max_groups`` groups when every group then has at least ``min_channels_per_group`` channels,
    else ``channels // min_channels_per_group`` groups (at least 1); the result is lowered to the
    nearest divisor of ``channels`` so ``nn.GroupNorm`` accepts it. Pass ``max_groups=1`` for a
    LayerNorm-like layer, or ``min_channels_per_group=1`` with ``max_groups=channels`` for
    InstanceNorm (G = C).

    Args:
        channels: number of channels C of the layer (>= 1).
        max_groups: the paper's default group count (32).
        min_channels_per_group: fewest channels per group before groups are merged (16).

    Returns:
        G, a divisor of ``channels`` with 1 <= G <= max_groups.

    Raises:
        ValueError: when an argument is not a positive integer.
    """
    for name, value in (
        ("channels", channels),
        ("max_groups", max_groups),
        ("min_channels_per_group", min_channels_per_group),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"num_groups_for: {name} must be a positive integer, got {value!r}")
    groups = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % groups:
        groups -= 1
    return groups


def groups_for_width(channels: int, num_groups: int | None) -> int:
    """Groups of a GroupNorm layer of ``channels`` channels: the one rule for built and converted models.

    Args:
        channels: layer width C.
        num_groups: the wanted group count G; ``None`` applies :func:`num_groups_for`. When G does
            not divide C, the largest divisor of C below G is used, so every group has channels
            (the same width-dependent rounding :func:`num_groups_for` applies).

    Raises:
        UsageError: ``num_groups`` below 1.
    """
    if num_groups is None:
        return num_groups_for(channels)
    if num_groups < 1:
        raise UsageError("num_groups", "must be at least 1", got=num_groups, expected=">= 1, or null for the rule")
    return max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)
