"""Figures of an evaluation: the Dice/HD95 box plot and contour overlays of the worst cases.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch, no display needed) and saved through :func:`medgn.files.atomic_path`. An overlay shows the
axial, coronal and sagittal planes through the reference structure's centre, or through a plane of
the structure with clearly more wrong voxels (a leak, a missed end; :func:`overlay_slices`),
oriented from the affine (world right and anterior/superior point right and up, RAS), with the
reference contour in green and the prediction contour in red over the image, or over the
reference when no image is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgn.errors import MedgnError
from medgn.files import atomic_path, fit_name
from medgn.logs import get_logger

if TYPE_CHECKING:
    from medgn.evaluate.results import EvaluationResult

log = get_logger(__name__)

# Views as (name, world axis normal to the plane); RAS world axes 0 = R, 1 = A, 2 = S.
VIEWS: tuple[tuple[str, int], ...] = (("axial", 2), ("coronal", 1), ("sagittal", 0))
REF_COLOUR = "#00d000"  # green: reference
PRED_COLOUR = "#ff2020"  # red: prediction
DPI = 100  # 100 dpi at 12 x 4.2 inches: 1200 x 420 px, readable and small on disk


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def write_boxplot(result: EvaluationResult, path: Path) -> Path:
    """Box plots of Dice (all rows) and HD95 (finite rows, infinite ones counted) per class."""
    from matplotlib.figure import Figure

    keys = list(result.summary["per_class"])
    width = max(6.0, 1.0 + 1.1 * len(keys))  # about an inch per class, at least 6 inches
    fig = Figure(figsize=(2 * width, 4.2))
    ax_dice, ax_hd = fig.subplots(1, 2)
    absent = set(result.absent)  # in no map of any case: NaN rows, an empty box
    dice = [[r.metrics.dice for r in result.rows if r.label == k and k not in absent] for k in keys]
    hd95 = [[r.metrics.hd95 for r in result.rows if r.label == k and k not in absent] for k in keys]
    finite = [[v for v in vals if math.isfinite(v)] for vals in hd95]
    positions = list(range(1, len(keys) + 1))
    if keys:
        ax_dice.boxplot([v if v else [math.nan] for v in dice], positions=positions)
        ax_hd.boxplot([v if v else [math.nan] for v in finite], positions=positions)
    ax_dice.set_xticks(positions, [f"{k}\n(absent)" if k in absent else k for k in keys])
    ax_hd.set_xticks(positions, [f"{k}\n({len(h) - len(f)} inf)" for k, h, f in zip(keys, hd95, finite)])
    ax_dice.set_ylim(-0.02, 1.02)  # Dice lives in [0, 1]; a small margin keeps 0 and 1 visible
    ax_dice.set_title("Dice per class")
    ax_hd.set_title("HD95 per class (finite cases)")
    ax_hd.set_ylabel("mm")
    fig.tight_layout()
    return _save(fig, path)


def find_image(image_dir: Path, cid: str) -> Path | None:
    """The image of case ``cid`` in ``image_dir`` (``<cid>`` or ``<cid>_0000`` with a volume suffix), or None."""
    from medgn.evaluate.results import CASE_SUFFIXES

    if image_dir.is_file():  # the image of a single evaluated case
        return image_dir
    for stem in (cid, f"{cid}_0000"):  # plain name, or the first channel in nnU-Net naming
        for suffix in CASE_SUFFIXES:
            candidate = image_dir / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _normal_axis(affine: np.ndarray, world_normal: int) -> int:
    """The array axis that runs along world axis ``world_normal`` (0 = R, 1 = A, 2 = S)."""
    from nibabel.orientations import io_orientation

    return int(np.flatnonzero(io_orientation(affine)[:, 0] == world_normal)[0])


def _plane(volume: np.ndarray, affine: np.ndarray, index: int, world_normal: int) -> tuple[np.ndarray, float]:
    """Plane ``index`` along the array axis normal to a world axis, displayed RAS-up/right.

    Returns the 2D array (row 0 at the bottom with ``origin="lower"``) and the display aspect.
    """
    from nibabel.orientations import io_orientation

    ornt = io_orientation(affine)  # row i: (world axis of array axis i, +1 / -1)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    normal = _normal_axis(affine, world_normal)
    plane = np.take(volume, index, axis=normal)
    axes = [a for a in range(3) if a != normal]
    axes.sort(key=lambda a: ornt[a, 0])  # horizontal: the lower world axis (R before A before S)
    for i, axis in enumerate(axes):
        if ornt[axis, 1] < 0:
            plane = np.flip(plane, axis=i)
    return plane.T, float(spacing[axes[1]] / spacing[axes[0]])


def overlay_slices(ref: np.ndarray, pred: np.ndarray, affine: np.ndarray) -> dict[str, int]:
    """The array index, along each view's normal, of the plane an overlay shows.

    The plane through the reference's centre, unless a plane that cuts the reference holds
    clearly more wrong voxels (1.5 times the centre plane's, ties broken toward the centre):
    then that one, so that a worst case's overlay shows a leak into a neighbouring structure or a
    missed end rather than a plane that looks right. An error spread evenly over the boundary (a
    mask one voxel too large) keeps the centre plane, where both contours show. With an empty
    reference the prediction takes its place; with both empty, the middle of the volume.
    """
    wrong = ref != pred
    base = ref if ref.any() else pred
    centre = np.rint(np.argwhere(base).mean(axis=0)).astype(int) if base.any() else np.asarray(ref.shape) // 2
    planes: dict[str, int] = {}
    for name, world_normal in VIEWS:
        normal = _normal_axis(affine, world_normal)
        others = tuple(a for a in range(3) if a != normal)
        per_plane = np.count_nonzero(wrong, axis=others)  # (size along normal,)
        cuts = base.any(axis=others) if base.any() else np.ones_like(per_plane, dtype=bool)
        scores = np.where(cuts, per_plane, -1)
        mid = int(centre[normal])
        # 1.5: an even boundary error varies by less between planes through the structure.
        if scores.max() > 1.5 * per_plane[mid]:
            best = np.flatnonzero(scores == scores.max())
            planes[name] = int(best[np.argmin(np.abs(best - mid))])
        else:
            planes[name] = mid
    return planes


def _overlay(path: Path, title: str, under: np.ndarray, ref: np.ndarray, pred: np.ndarray, affine: np.ndarray) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    planes = overlay_slices(ref, pred, affine)
    fig = Figure(figsize=(12, 4.2))
    for ax, (name, normal) in zip(fig.subplots(1, 3), VIEWS):
        img2d, aspect = _plane(under, affine, planes[name], normal)
        ax.imshow(img2d, cmap="gray", origin="lower", aspect=aspect, interpolation="nearest")
        for mask, colour in ((ref, REF_COLOUR), (pred, PRED_COLOUR)):
            m2d, _ = _plane(mask.astype(np.float32), affine, planes[name], normal)
            if m2d.min() < 0.5 < m2d.max() and min(m2d.shape) >= 2:  # contour needs a crossing
                ax.contour(m2d, levels=[0.5], colors=colour, linewidths=1.0)
        ax.set_title(f"{name}, slice {planes[name]}")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [
        Line2D([], [], color=REF_COLOUR, label="reference"),
        Line2D([], [], color=PRED_COLOUR, label="prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2)
    fig.suptitle(title)
    return _save(fig, path)


def write_overlays(
    result: EvaluationResult,
    folder: Path,
    refs: Mapping[str, Path],
    preds: Mapping[str, Path],
    image_dir: Path | None,
    worst_k: int,
) -> list[Path]:
    """Overlay PNGs ``<case>_label-<label>.png`` for the ``worst_k`` worst cases of each label."""
    from medgn.data.io import geometry_diff, read_volume
    from medgn.data.multichannel import read_display_volume
    from medgn.evaluate.metrics import structure_mask
    from medgn.evaluate.predictions import read_prediction
    from medgn.evaluate.report import worst_cases

    written: list[Path] = []
    worst = worst_cases(result, worst_k)
    if not any(worst.values()):
        return written
    folder.mkdir(exist_ok=True)
    for key, cases in worst.items():
        for cid in cases:
            try:
                ref = read_volume(refs[cid], label=True)
                pred = read_prediction(preds[cid], ref)
                under = ref.array.astype(np.float32)
                image_path = find_image(image_dir, cid) if image_dir is not None else None
                note = " (no image found: over the reference)" if image_dir is not None else ""
                image = None
                if image_path is not None:
                    try:
                        image = read_display_volume(image_path)
                    except MedgnError as exc:  # the overlay is still worth drawing, over the reference
                        log.warning("%s: cannot read the image (%s); drawing over the reference", cid, exc.one_line())
                        note = " (image unreadable: over the reference)"
                if image is not None:
                    diffs = geometry_diff(image, ref)
                    if diffs:
                        log.warning(
                            "%s: image geometry differs from the reference (%s); drawing over the reference",
                            image_path,
                            "; ".join(diffs),
                        )
                        note = " (image geometry differs: over the reference)"
                    else:
                        under, note = image.array, ""
                m = result.value(cid, key, "dice"), result.value(cid, key, "hd95")
                title = f"{cid}, label {key}: Dice {m[0]:.3f}, HD95 {m[1]:.2f} mm{note}"
                ref_mask, pred_mask = structure_mask(ref.array, int(key)), structure_mask(pred.array, int(key))
                written.append(
                    _overlay(folder / fit_name(f"{cid}_label-{key}.png"), title, under, ref_mask, pred_mask, ref.affine)
                )
            except MedgnError as exc:
                log.warning("no overlay for %s, label %s: %s", cid, key, exc.one_line())
    return written
