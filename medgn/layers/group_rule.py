"""The group-count rule for GroupNorm layers: how many groups a layer of C channels gets.

Wu & He (ECCV 2018) use G = 32 groups and, with a fixed group size, 16 channels per group. On
ImageNet every setting between G = 2 and G = 64 lies within 0.6 % error, while G = 1 (LayerNorm)
is clearly worse. The narrow stages of a 3D U-Net (16-64 channels) are where the rule matters:
"16 channels per group" makes a 16-channel stage LayerNorm. medgn's default,
:data:`DEFAULT_CHANNELS_PER_GROUP`, comes from its own study on LA2018 (README, "Group rule"):
G = min(32, C // channels_per_group), lowered to a divisor of C; with the default of 1 that is
the paper's G = 32, capped at one group per channel in layers narrower than 32 channels. The two ends of the family are
valid too: G = 1 normalises all channels together (LayerNorm over C x spatial) and G = C normalises
each channel alone (InstanceNorm).

:func:`resolve_groups` is the one rule every layer uses (the model's norm factory and
``convert_norm``): a fixed G that does not divide C becomes the largest divisor of C below it.
"""

from __future__ import annotations

import functools
import logging

__all__ = ["DEFAULT_CHANNELS_PER_GROUP", "MAX_GROUPS", "num_groups_for", "resolve_groups"]

# The paper's group count.
MAX_GROUPS = 32
# Channels per group at narrow layers: medgn's norm study on LA2018 (README "Group rule") found
# validation Dice falling as groups grow (1 > 2 > 4 > 8 > 16 channels per group at batch 2), so a
# layer keeps the paper's 32 groups down to one channel per group: G = min(32, C).
DEFAULT_CHANNELS_PER_GROUP = 1


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"group rule: {name} must be a positive integer, got {value!r}")
    return value


def _divisor_at_most(channels: int, groups: int) -> int:
    groups = max(1, min(groups, channels))
    while channels % groups:
        groups -= 1
    return groups


def num_groups_for(
    channels: int, max_groups: int = MAX_GROUPS, min_channels_per_group: int = DEFAULT_CHANNELS_PER_GROUP
) -> int:
    """Number of GroupNorm groups for a layer with ``channels`` channels.

    ``max_groups`` groups when every group then has at least ``min_channels_per_group`` channels,
    else ``channels // min_channels_per_group`` groups (at least 1); the result is lowered to the
    nearest divisor of ``channels`` so ``nn.GroupNorm`` accepts it. Pass ``max_groups=1`` for a
    LayerNorm-like layer, or ``min_channels_per_group=1`` with ``max_groups=channels`` for
    InstanceNorm (G = C).

    Args:
        channels: number of channels C of the layer (>= 1).
        max_groups: the paper's group count (32).
        min_channels_per_group: fewest channels per group before groups are merged.

    Returns:
        G, a divisor of ``channels`` with 1 <= G <= max_groups.

    Raises:
        ValueError: when an argument is not a positive integer.
    """
    channels = _positive("channels", channels)
    max_groups = _positive("max_groups", max_groups)
    per_group = _positive("min_channels_per_group", min_channels_per_group)
    return _divisor_at_most(channels, min(max_groups, channels // per_group))


@functools.cache  # once per (C, asked): a network builds the same layer widths many times
def _note_other_groups(channels: int, asked: int, used: int) -> None:
    """Say in the log (the run's medgn.log) that a fixed group count was changed for a layer width."""
    logging.getLogger(__name__).info(
        "num_groups=%d: a %d-channel layer takes %d groups (the largest divisor of %d not above %d)",
        asked,
        channels,
        used,
        channels,
        asked,
    )


def resolve_groups(channels: int, num_groups: int | None = None, channels_per_group: int | None = None) -> int:
    """Groups of one layer: a fixed count, or the rule.

    Args:
        channels: layer width C.
        num_groups: a fixed group count G (the largest divisor of C not above G is used), or
            ``None`` for the rule.
        channels_per_group: the rule's channels per group at narrow layers (default
            :data:`DEFAULT_CHANNELS_PER_GROUP`).

    Raises:
        ValueError: an argument is not a positive integer.
    """
    if num_groups is not None:
        used = _divisor_at_most(_positive("channels", channels), _positive("num_groups", num_groups))
        if used != num_groups:
            _note_other_groups(channels, num_groups, used)
        return used
    return num_groups_for(channels, MAX_GROUPS, channels_per_group or DEFAULT_CHANNELS_PER_GROUP)
