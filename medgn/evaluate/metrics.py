"""Segmentation metrics per class: overlap, surface distances, the empty-mask policy and summaries.

Overlap (Dice, IoU) is counted exactly in integers; the surface metrics (HD95, average symmetric
surface distance, normalized surface Dice at a tolerance in mm) are computed with scipy from
spacing-aware surface distances exactly as MONAI's ``compute_*`` functions compute them (tested), so
every distance is in mm and this package needs no torch. The empty policy is explicit
and always flagged: both masks empty gives Dice 1, distances 0 (``both_empty``); exactly one empty
gives Dice 0 and infinite distances (``ref_empty`` / ``pred_empty``). Infinite distances stay
infinite: :func:`summarize` computes statistics over the finite values and reports how many were
infinite, so they are never averaged in silently. A structure in no reference and no prediction of
any evaluated case is not scored at all (:func:`absent_metrics`: NaN, flagged ``absent``), as
nnU-Net and MONAI leave a class without voxels out of the mean. Hierarchical regions (e.g. BraTS whole tumour =
labels {1, 2, 3, 4}) are evaluated as the union of their labels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medgn.data.boxes import nonzero_box

METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "hd95", "assd", "nsd")
# Metrics that are distances in mm (can be infinite) versus bounded scores in [0, 1].
DISTANCE_METRICS: tuple[str, ...] = ("hd95", "assd")

FLAG_BOTH_EMPTY = "both_empty"
FLAG_REF_EMPTY = "ref_empty"
FLAG_PRED_EMPTY = "pred_empty"
FLAG_MISSING = "missing"
FLAG_FAILED = "failed"
FLAG_ABSENT = "absent"


@dataclass(frozen=True)
class ClassMetrics:
    """Metrics of one structure (label or region) in one case.

    Attributes:
        dice: Dice similarity coefficient in [0, 1].
        iou: intersection over union (Jaccard) in [0, 1].
        hd95: 95th-percentile symmetric Hausdorff distance in mm (``inf`` when one side is empty).
        assd: average symmetric surface distance in mm (``inf`` when one side is empty).
        nsd: normalized surface Dice at the tolerance, in [0, 1].
        flags: policy flags that applied (``both_empty``, ``ref_empty``, ``pred_empty``,
            ``missing``, ``failed``, ``absent``).
    """

    dice: float
    iou: float
    hd95: float
    assd: float
    nsd: float
    flags: tuple[str, ...] = ()

    def value(self, name: str) -> float:
        """The metric called ``name`` (one of :data:`METRIC_NAMES`)."""
        return float(getattr(self, name))


def failed_metrics(flag: str) -> ClassMetrics:
    """Metrics of a case that could not be evaluated (missing or failed): Dice 0, distances inf."""
    return ClassMetrics(dice=0.0, iou=0.0, hd95=math.inf, assd=math.inf, nsd=0.0, flags=(flag,))


def absent_metrics() -> ClassMetrics:
    """Metrics of a structure found in no reference and no prediction of any evaluated case: NaN.

    Such a structure (e.g. ``--labels 1,7`` where no map holds a 7) cannot be scored; a Dice of 1
    there would only raise the mean. The statistics leave these rows out.
    """
    return ClassMetrics(dice=math.nan, iou=math.nan, hd95=math.nan, assd=math.nan, nsd=math.nan, flags=(FLAG_ABSENT,))


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be {ndim} positive finite numbers, got {spacing!r}")
    return values


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus a 1-voxel margin.

    The margin keeps every surface voxel a surface voxel after cropping (erosion treats the array
    border as background); distances between surfaces do not depend on the crop.
    """
    union = pred | ref
    found = nonzero_box(union)
    assert found is not None  # callers score the surfaces only when both masks have voxels
    slices = [slice(max(s.start - 1, 0), s.stop + 1) for s in found]
    box = tuple(slices)
    pad = [(1 if s.start == 0 else 0, 1 if s.stop > n else 0) for s, n in zip(slices, union.shape)]
    return np.pad(pred[box], pad), np.pad(ref[box], pad)


def binary_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = 2.0,
) -> ClassMetrics:
    """Dice, IoU, HD95, ASSD and NSD of one binary prediction against one binary reference.

    Args:
        pred: predicted mask, any shape, nonzero = inside.
        ref: reference mask of the same shape.
        spacing: voxel size in mm along each array axis.
        nsd_tolerance_mm: the surface Dice tolerance in mm (a surface point within this distance
            of the other surface counts as correct).

    Returns:
        The metrics, with the empty policy applied and flagged.

    Raises:
        ValueError: shapes differ, the spacing is not positive, or the tolerance is negative.
    """
    pred = np.asarray(pred) != 0
    ref = np.asarray(ref) != 0
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    spacing_mm = _check_spacing(spacing, pred.ndim)
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"nsd_tolerance_mm must be a finite number >= 0, got {nsd_tolerance_mm!r}")
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    if n_pred == 0 and n_ref == 0:
        return ClassMetrics(dice=1.0, iou=1.0, hd95=0.0, assd=0.0, nsd=1.0, flags=(FLAG_BOTH_EMPTY,))
    if n_ref == 0 or n_pred == 0:
        flag = FLAG_REF_EMPTY if n_ref == 0 else FLAG_PRED_EMPTY
        return ClassMetrics(dice=0.0, iou=0.0, hd95=math.inf, assd=math.inf, nsd=0.0, flags=(flag,))
    # Integer counts are exact at any volume size (a float32 sum stops being exact above 2**24).
    inter = int(np.count_nonzero(pred & ref))
    dice = 2.0 * inter / (n_pred + n_ref)
    iou = inter / (n_pred + n_ref - inter)
    hd95, assd, nsd = _surface_metrics(*_crop_to_union(pred, ref), spacing_mm, nsd_tolerance_mm)
    return ClassMetrics(dice=dice, iou=iou, hd95=hd95, assd=assd, nsd=nsd)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its erosion by the 6-connected cross (outside counts as 0)."""
    from scipy.ndimage import binary_erosion

    return mask ^ binary_erosion(mask, border_value=0)


def _directed_distances(src: np.ndarray, dst: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Distance (mm) from every surface voxel of ``src`` to the nearest surface voxel of ``dst``."""
    from scipy.spatial import KDTree

    dst_xyz = np.argwhere(dst).astype(np.float64) * scale
    src_xyz = np.argwhere(src).astype(np.float64) * scale
    # leafsize 32: one batched query per tree, where larger leaves are faster than the default 16.
    distances = KDTree(dst_xyz, leafsize=32).query(src_xyz, k=1)[0]
    # float32 as MONAI's surface distances, so the reductions below give MONAI's numbers exactly.
    return distances.astype(np.float32).astype(np.float64)


def _surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tolerance: float
) -> tuple[float, float, float]:
    """HD95, ASSD and NSD of two non-empty masks from one surface-distance computation.

    Surfaces are the voxels a 6-connected erosion removes, within the bounding box of both masks;
    distances are Euclidean in mm between surface voxels, both ways. This is what MONAI's
    ``compute_hausdorff_distance(percentile=95)``, ``compute_average_surface_distance(
    symmetric=True)`` and ``compute_surface_dice`` compute (a test checks the equality), with numpy
    and scipy only and the reductions in float64.
    """
    union = pred | ref
    box = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in np.nonzero(union))
    pred_edges, ref_edges = _edges(pred[box]), _edges(ref[box])
    scale = np.asarray(spacing, dtype=np.float64)
    d_pr = _directed_distances(pred_edges, ref_edges, scale)
    d_rp = _directed_distances(ref_edges, pred_edges, scale)
    # 95th percentile with linear interpolation, as torch.quantile in MONAI's Hausdorff distance;
    # the symmetric value is the larger of the two directed ones.
    hd95 = max(float(np.percentile(d_pr, 95)), float(np.percentile(d_rp, 95)))
    assd = float(np.concatenate([d_pr, d_rp]).mean())
    # The tolerance in float32 too, as MONAI compares them: a distance of exactly the tolerance (a
    # one-voxel shift at a 0.6 mm tolerance and 0.6 mm spacing) counts as within it, whichever
    # way each was rounded to float32.
    tol = float(np.float32(tolerance))
    nsd = float((np.count_nonzero(d_pr <= tol) + np.count_nonzero(d_rp <= tol)) / (d_pr.size + d_rp.size))
    return hd95, assd, nsd


@dataclass(frozen=True)
class Segments:
    """Binary segments that may overlap (a DICOM-SEG's), as a label map cannot hold them.

    Attributes:
        shape: the grid's shape.
        voxels: label value -> flat indices of the segment's voxels in that grid.
    """

    shape: tuple[int, ...]
    voxels: Mapping[int, np.ndarray]

    def mask(self, labels: Iterable[int]) -> np.ndarray:
        """Boolean mask of the union of the segments of ``labels`` (absent ones are empty)."""
        out = np.zeros(int(np.prod(self.shape)), dtype=bool)
        for label in labels:
            if int(label) in self.voxels:
                out[self.voxels[int(label)]] = True
        return out.reshape(self.shape)

    def present(self) -> list[int]:
        """The label values of the segments that hold voxels."""
        return sorted(v for v, idx in self.voxels.items() if idx.size)


def structure_mask(array: np.ndarray | Segments, labels: int | Iterable[int]) -> np.ndarray:
    """Boolean mask of one label, or of the union of several labels (a hierarchical region)."""
    if isinstance(array, Segments):
        return array.mask([labels] if isinstance(labels, (int, np.integer)) else labels)
    if isinstance(labels, (int, np.integer)):
        return array == labels
    return np.isin(array, np.asarray(list(labels)))


def case_metrics(
    pred: np.ndarray | Segments,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: Sequence[int],
    regions: Mapping[str, Sequence[int]] | None = None,
    nsd_tolerance_mm: float = 2.0,
) -> dict[str, ClassMetrics]:
    """Metrics of every label and region of one case, keyed by ``str(label)`` or region name.

    Args:
        pred: predicted label map (integers), or segments that may overlap (each scored whole).
        ref: reference label map of the same shape.
        spacing: voxel size in mm along each array axis.
        labels: the foreground labels to evaluate, each on its own.
        regions: optional named unions of labels, e.g. ``{"whole_tumour": (1, 2, 3, 4)}``.
        nsd_tolerance_mm: the surface Dice tolerance in mm.
    """
    out: dict[str, ClassMetrics] = {}
    for label in labels:
        out[str(label)] = binary_metrics(
            structure_mask(pred, label), structure_mask(ref, label), spacing, nsd_tolerance_mm
        )
    for name, members in (regions or {}).items():
        out[name] = binary_metrics(
            structure_mask(pred, members), structure_mask(ref, members), spacing, nsd_tolerance_mm
        )
    return out


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, std (population), median, min and max over the finite values, with counts.

    Infinite values are not averaged in: they are counted in ``n_inf``; the statistics are
    ``None`` when no finite value exists. NaN never occurs (the empty policy avoids it, and the
    callers leave out the rows of absent structures) and is refused.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    if np.isnan(arr).any():
        raise ValueError("NaN metric value: the empty-mask policy should have prevented it")
    finite = arr[np.isfinite(arr)]
    stats: dict[str, float | int | None] = {"n": int(arr.size), "n_finite": int(finite.size)}
    stats["n_inf"] = int(arr.size - finite.size)
    if finite.size == 0:
        stats.update(mean=None, std=None, median=None, min=None, max=None)
    else:
        stats.update(
            mean=float(finite.mean()),
            std=float(finite.std()),
            median=float(np.median(finite)),
            min=float(finite.min()),
            max=float(finite.max()),
        )
    return stats
