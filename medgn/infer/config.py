"""The ``infer`` section of a run config: how ``medgn infer`` runs this model unless told otherwise.

This module owns the frozen :class:`InferConfig`. It travels inside every checkpoint with the rest
of the run config, so a recipe's inference defaults (mirroring test-time augmentation and its axes)
go wherever the model goes: ``medgn infer`` with default settings, ``docker run``, fold ensembles.
The command line overrides them (``--tta``/``--no-tta``, ``--mirror-axes``). The layout the network
runs in at inference can differ from the training one: on the CPU a bf16 training step is fastest
contiguous and a bf16 forward pass channels-last (``benchmarks/results/cpu_amp.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medgn.models.config import MemoryFormat


def distinct_spatial_axes(axes: tuple[int, ...]) -> bool:
    """Whether ``axes`` are distinct spatial axes (0, 1, 2): the one rule for mirror axes."""
    return len(set(axes)) == len(axes) and all(a in (0, 1, 2) for a in axes)


@dataclass(frozen=True)
class InferConfig:
    """Inference defaults a model carries.

    Attributes:
        tta: average the softmax over mirrored copies of the input (every subset of
            ``mirror_axes``: 2, 4 or 8 forward passes per window) by default.
        mirror_axes: spatial axes (0, 1, 2 of the planned array) the test-time augmentation flips;
            the axes the training flips make a network symmetric under.
        memory_format: the activation layout of the network at inference; null: the model's own
            (``model.memory_format``). Only the speed changes, not the weights.
    """

    tta: bool = False
    mirror_axes: tuple[int, ...] = field(default=(0, 1, 2), metadata={"min": 0, "max": 2})
    memory_format: MemoryFormat | None = None

    def __post_init__(self) -> None:
        if not self.mirror_axes or not distinct_spatial_axes(self.mirror_axes):
            raise ValueError(f"infer.mirror_axes must be distinct axes of 0, 1, 2, got {list(self.mirror_axes)}")
