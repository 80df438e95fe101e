"""The settings of one inference run, as one frozen object.

This module owns :class:`InferSettings`: everything ``medgn infer`` takes besides the models, the
input and the output folder. :func:`medgn.infer.run.infer` receives it whole, builds the
sliding-window :class:`~medgn.infer.sliding_window.WindowSettings` from it and the plan, and
records it as-is in every case sidecar (``infer_settings``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from medgn.errors import UsageError

POSTPROCESS = ("auto", "none", "lcc")


@dataclass(frozen=True)
class InferSettings:
    """How to run inference.

    Attributes:
        device: "cpu" or "cuda[:i]" (plain "cuda" under torchrun: ``cuda:$LOCAL_RANK``).
        tta: average over mirrored inputs (all 2**len(mirror_axes) flips); None: what the models
            carry (their configs' ``infer.tta``).
        overlap: sliding-window overlap fraction in [0, 1); 0.5 is nnU-Net's default.
        sw_batch_size: windows per forward pass (2: fits a 24 GB GPU at the largest planned patch).
        mirror_axes: spatial axes TTA mirrors; None: the models' ``infer.mirror_axes``.
        save_probabilities: also write float16 class probabilities.
        largest_component: keep only the largest connected component of each class (the same as
            ``postprocess="lcc"``).
        postprocess: "auto" applies the models' own decision (``postprocessing.json``, chosen from
            held-out cases when they were trained; pooled over an ensemble's folds), "none", or
            "lcc" (largest component of every class).
        precision: "auto" (bf16 autocast where the device computes bf16 natively), "bf16", "fp32".
        overwrite: redo cases whose outputs came from other models, settings or inputs.
        shard: ``"i/n"``: every n-th case (sorted by id) from i; default from RANK/WORLD_SIZE.
        channels: channel names: a folder's ``<case>_<name>`` files form the channels in this order.
        threads: CPU threads for inference on the CPU (None keeps torch's setting).
        progress: show a live progress display on stderr.
        output_format: "nifti", "dicom-seg" or "both"; None: both for DICOM series, nifti for files.
        limits: header and resampled-size limits (None: the defaults).
    """

    device: str = "cpu"
    tta: bool | None = None
    overlap: float = 0.5
    sw_batch_size: int = 2
    mirror_axes: tuple[int, ...] | None = None
    save_probabilities: bool = False
    largest_component: bool = False
    overwrite: bool = False
    shard: str | tuple[int, int] | None = None
    channels: tuple[str, ...] | None = None
    threads: int | None = None
    progress: bool = False
    output_format: str | None = None
    limits: Any = None
    postprocess: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        # The window settings' own rules (WindowSettings), checked before a model is loaded or a folder made.
        if not 0.0 <= float(self.overlap) < 1.0:
            raise UsageError("--overlap", "overlap out of range", got=self.overlap, expected="a fraction in [0, 1)")
        if int(self.sw_batch_size) < 1:
            raise UsageError(
                "--sw-batch-size", "needs at least one window per forward", got=self.sw_batch_size, expected=">= 1"
            )
        if self.postprocess not in POSTPROCESS:
            raise UsageError(
                "--postprocess", "unknown post-processing", got=self.postprocess, expected=" or ".join(POSTPROCESS)
            )
        if self.largest_component and self.postprocess == "none":
            raise UsageError(
                "--largest-component",
                "asks for the largest component, --postprocess none for no post-processing",
                expected="one of them (--largest-component is --postprocess lcc)",
            )

    @classmethod
    def of(cls, base: InferSettings | None = None, **changes: Any) -> InferSettings:
        """``base`` (default settings when None) with ``changes``; an unknown name is a usage error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise UsageError("infer", f"unknown setting(s) {', '.join(unknown)}", expected=", ".join(sorted(known)))
        if changes.get("mirror_axes") is not None:
            changes["mirror_axes"] = tuple(int(a) for a in changes["mirror_axes"])
        if changes.get("channels") is not None:
            changes["channels"] = tuple(str(c) for c in changes["channels"])
        # Field by field (not asdict): a Limits value stays a Limits object.
        values = {**({f.name: getattr(base, f.name) for f in fields(cls)} if base is not None else {}), **changes}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record (tuples as lists)."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
