"""Subcommands of the ``medgn`` CLI: each module parses its arguments and calls the Python API.

This module owns :func:`limits_from_args`, the one reading of the ``--max-*`` limit flags that
``verify``, ``plan`` and ``infer`` share.
"""

from __future__ import annotations

import argparse
import dataclasses

from medgn.data.preflight import DEFAULT_LIMITS, Limits
from medgn.errors import UsageError

# The limit flags a subcommand may define (argparse destinations); an absent one keeps its default.
LIMIT_FLAGS = ("max_voxels", "max_dim", "max_resampled_voxels", "max_windows")


def limits_from_args(args: argparse.Namespace) -> Limits:
    """:class:`Limits` from whichever of ``--max-voxels``, ``--max-dim``, ``--max-resampled-voxels``
    and ``--max-windows`` the subcommand defines.

    Raises:
        UsageError: a limit below 1 (exit 2), naming the flag.
    """
    values = {name: getattr(args, name, None) for name in LIMIT_FLAGS}
    bad = {k: v for k, v in values.items() if v is not None and v < 1}
    if bad:
        raise UsageError(
            "--" + next(iter(bad)).replace("_", "-"),
            "limit must be positive",
            got=next(iter(bad.values())),
            expected=">= 1",
        )
    given = {k: v for k, v in values.items() if v is not None}
    voxels = given.get("max_voxels", DEFAULT_LIMITS.max_voxels)
    # 8 bytes per voxel: a float64 scan at the voxel limit stays within the byte limit.
    return dataclasses.replace(DEFAULT_LIMITS, **given, max_bytes=max(DEFAULT_LIMITS.max_bytes, voxels * 8))
