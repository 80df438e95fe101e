"""The smallest training settings the tests train with, as ``--set`` arguments of ``medgn``.

Two stages of 4 and 8 channels on 16^3 patches, two folds, no worker processes, fp32: seconds per
run on two cores. ``tiny_sets({"train.lr": "0.01"})`` adds or replaces settings.
"""

from __future__ import annotations

from collections.abc import Mapping

TINY = {
    "model.features": "[4,8]",
    "plan.patch_size": "[16,16,16]",
    "plan.n_folds": "2",
    "data.num_workers": "0",
    "train.amp": "off",
}


def tiny_sets(changes: Mapping[str, str] | None = None) -> list[str]:
    """``["--set", "key=value", ...]`` for the tiny settings with ``changes`` applied."""
    settings = {**TINY, **(changes or {})}
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
