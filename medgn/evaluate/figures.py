"""Figures of an evaluation: the Dice/HD95 box plot and contour overlays of the worst cases.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch, no display needed) and saved through :func:`medgn.files.atomic_path`. An overlay shows the
axial, coronal and sagittal planes through the reference structure's centre, or through a plane of
the structure with clearly more wrong voxels (a leak, a missed end; :func:`overlay_slices`),
oriented from the affine in radiological convention (the patient's right on the viewer's left in
axial and coronal planes, anterior on the left in sagittal ones, superior and anterior up), each
edge lettered (R/L, A/P, S/I), whatever order the file stores its axes in. The reference contour is
wide and green, the prediction's narrow and red on top of it (where they agree, a red line inside a
green band), over the image in one intensity window for all three planes (its 0.5-99.5 percentiles),
or over the reference when no image is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgn.errors import MedgnError
from medgn.evaluate.metrics import FLAG_FAILED, FLAG_MISSING
from medgn.files import atomic_path, fit_name
from medgn.logs import get_logger

if TYPE_CHECKING:
    from medgn.evaluate.results import EvaluationResult

log = get_logger(__name__)

# Views as (name, world axis normal to the plane); RAS world axes 0 = R, 1 = A, 2 = S.
VIEWS: tuple[tuple[str, int], ...] = (("axial", 2), ("coronal", 1), ("sagittal", 0))
# The letters at a plane's edges: (left, right) for the horizontal world axis, (bottom, top) for the
# vertical one. Radiological convention: the horizontal axis runs toward the patient's left (or
# posterior, in a sagittal plane) from the viewer's left.
EDGE_LETTERS: dict[int, tuple[str, str]] = {0: ("R", "L"), 1: ("A", "P")}
UP_LETTERS: dict[int, tuple[str, str]] = {1: ("P", "A"), 2: ("I", "S")}
REF_COLOUR = "#00d000"  # green: reference
PRED_COLOUR = "#ff2020"  # red: prediction
REF_WIDTH, PRED_WIDTH = 2.4, 1.0  # the reference's band stays visible around an agreeing prediction
WINDOW_PERCENTILES = (0.5, 99.5)  # one grey window for the three planes of an image
DPI = 100  # 100 dpi at 12 x 4.2 inches: 1200 x 420 px, readable and small on disk


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def boxplot_data(result: EvaluationResult) -> tuple[list[list[float]], list[list[float]], list[str], list[str]]:
    """Per structure: the Dice values, the finite HD95 values and the two panels' tick labels.

    An absent structure (in no map of any case) is marked so on both panels; missing and failed
    cases, which score Dice 0, are counted under the Dice box; infinite HD95s under the HD95 box.
    """
    keys = list(result.summary["per_class"])
    absent = set(result.absent)
    rows = [[r for r in result.rows if r.label == k and k not in absent] for k in keys]
    dice = [[r.metrics.dice for r in group] for group in rows]
    hd95 = [[r.metrics.hd95 for r in group] for group in rows]
    finite = [[v for v in vals if math.isfinite(v)] for vals in hd95]
    lost = [sum(bool({FLAG_MISSING, FLAG_FAILED} & set(r.metrics.flags)) for r in group) for group in rows]
    shown = [result.named(k) for k in keys]
    dice_ticks = [
        f"{s}\n(absent)" if k in absent else f"{s}\n({n} missing/failed, Dice 0)" if n else s
        for k, s, n in zip(keys, shown, lost)
    ]
    hd_ticks = [
        f"{s}\n(absent)" if k in absent else f"{s}\n({len(h) - len(f)} inf)"
        for k, s, h, f in zip(keys, shown, hd95, finite)
    ]
    return dice, finite, dice_ticks, hd_ticks


def write_boxplot(result: EvaluationResult, path: Path) -> Path:
    """Box plots of Dice (all rows) and HD95 (finite rows, infinite ones counted) per class."""
    from matplotlib.figure import Figure

    keys = list(result.summary["per_class"])
    width = max(6.0, 1.0 + 1.1 * len(keys))  # about an inch per class, at least 6 inches
    fig = Figure(figsize=(2 * width, 4.4))
    ax_dice, ax_hd = fig.subplots(1, 2)
    dice, finite, dice_ticks, hd_ticks = boxplot_data(result)
    positions = list(range(1, len(keys) + 1))
    if keys:
        ax_dice.boxplot([v if v else [math.nan] for v in dice], positions=positions)
        ax_hd.boxplot([v if v else [math.nan] for v in finite], positions=positions)
    ax_dice.set_xticks(positions, dice_ticks)
    ax_hd.set_xticks(positions, hd_ticks)
    ax_dice.set_ylim(-0.02, 1.02)  # Dice lives in [0, 1]; a small margin keeps 0 and 1 visible
    ax_dice.set_title("Dice per class")
    ax_dice.set_ylabel("Dice")
    ax_hd.set_title("HD95 per class (finite cases; 'inf': one map empty, missing or failed)")
    ax_hd.set_ylabel("HD95 (mm)")
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


def _plane(volume: np.ndarray, affine: np.ndarray, index: int, world_normal: int) -> tuple[np.ndarray, float, int, int]:
    """Plane ``index`` along the array axis normal to a world axis, in radiological display.

    Returns the 2D array (rows: the vertical world axis, up with ``origin="lower"``; columns: the
    horizontal one, toward the patient's left or posterior), the display aspect (row over column
    spacing) and the horizontal and vertical world axes.
    """
    from nibabel.orientations import io_orientation

    ornt = io_orientation(affine)  # row i: (world axis of array axis i, +1 / -1)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    normal = _normal_axis(affine, world_normal)
    plane = np.take(volume, index, axis=normal)  # its axes: the other two array axes, in array order
    rest = [a for a in range(3) if a != normal]
    horizontal, vertical = sorted(rest, key=lambda a: ornt[a, 0])  # R before A before S
    if rest[0] != vertical:  # rows along the vertical axis, whatever order the file stores them in
        plane = plane.T
    if ornt[vertical, 1] < 0:  # up is anterior or superior
        plane = np.flip(plane, axis=0)
    if ornt[horizontal, 1] > 0:  # rightward is the patient's left (from R) or posterior (from A)
        plane = np.flip(plane, axis=1)
    return plane, float(spacing[vertical] / spacing[horizontal]), int(ornt[horizontal, 0]), int(ornt[vertical, 0])


def _rising(affine: np.ndarray, axis: int) -> bool:
    """Whether the index along array ``axis`` grows with the world coordinate."""
    from nibabel.orientations import io_orientation

    return bool(io_orientation(affine)[axis, 1] > 0)


def _centre_index(mask: np.ndarray, axis: int, affine: np.ndarray) -> int:
    """The index along array ``axis`` nearest the centre of ``mask``; a centre halfway between two
    planes takes the one lower in world coordinates, so that the same scan stored flipped shows the
    same plane."""
    centre = float(np.argwhere(mask)[:, axis].mean())
    return int(np.ceil(centre - 0.5)) if _rising(affine, axis) else int(np.floor(centre + 0.5))


def _nearest(candidates: np.ndarray, target: int, axis: int, affine: np.ndarray) -> int:
    """The candidate plane nearest ``target``; of two as near, the one lower in world coordinates
    (the same plane for a scan stored flipped)."""
    rising = _rising(affine, axis)
    return int(min(candidates, key=lambda c: (abs(int(c) - target), int(c) if rising else -int(c))))


def overlay_slices(ref: np.ndarray, pred: np.ndarray, affine: np.ndarray) -> dict[str, int]:
    """The array index, along each view's normal, of the plane an overlay shows.

    The plane through the reference's centre, unless a plane that cuts the reference holds
    clearly more wrong voxels (1.5 times the centre plane's, ties broken toward the centre):
    then that one, so that a worst case's overlay shows a leak into a neighbouring structure or a
    missed end rather than a plane that looks right. An error spread evenly over the boundary (a
    mask one voxel too large) keeps the centre plane, where both contours show. With an empty
    reference the prediction takes its place; with both empty, the middle of the volume. Where no
    plane of a view cuts both (a prediction beside the structure), the axial view shows the
    reference and the other two the prediction; and a prediction that no chosen plane would cut
    moves the other two views to planes that cut it.
    """
    wrong = ref != pred
    planes: dict[str, int] = {}
    for name, world_normal in VIEWS:
        normal = _normal_axis(affine, world_normal)
        others = tuple(a for a in range(3) if a != normal)
        base = ref if ref.any() else pred
        if ref.any() and pred.any() and not (ref.any(axis=others) & pred.any(axis=others)).any():
            # No plane of this view shows both (a prediction beside the structure): the first view
            # shows the reference, the others the prediction, so that the figure shows both.
            base = ref if name == VIEWS[0][0] else pred
        per_plane = np.count_nonzero(wrong, axis=others)  # (size along normal,)
        cuts = base.any(axis=others) if base.any() else np.ones_like(per_plane, dtype=bool)
        scores = np.where(cuts, per_plane, -1)
        mid = _centre_index(base, normal, affine) if base.any() else ref.shape[normal] // 2
        # 1.5: an even boundary error varies by less between planes through the structure.
        if scores.max() > 1.5 * per_plane[mid]:
            planes[name] = _nearest(np.flatnonzero(scores == scores.max()), mid, normal, affine)
        else:
            planes[name] = mid
    if (
        ref.any()
        and pred.any()
        and not any(np.take(pred, planes[name], axis=_normal_axis(affine, n)).any() for name, n in VIEWS)
    ):
        # A prediction that no chosen plane cuts (a false positive off the structure's edge): the
        # views after the first move to the plane cutting both with the most wrong voxels, or,
        # where none cuts both, to the prediction's centre.
        for name, world_normal in VIEWS[1:]:
            normal = _normal_axis(affine, world_normal)
            others = tuple(a for a in range(3) if a != normal)
            both = ref.any(axis=others) & pred.any(axis=others)
            if both.any():
                per_plane = np.where(both, np.count_nonzero(wrong, axis=others), -1)
                best = np.flatnonzero(per_plane == per_plane.max())
                planes[name] = _nearest(best, _centre_index(pred, normal, affine), normal, affine)
            else:
                planes[name] = _centre_index(pred, normal, affine)
    return planes


def _window(under: np.ndarray) -> tuple[float, float]:
    """One grey window for every plane: the volume's 0.5-99.5 percentiles (a few bright voxels, a
    contrast blob or a metal artefact, would otherwise darken the one plane that holds them)."""
    values = np.asarray(under, dtype=np.float32)
    lo, hi = np.percentile(values, WINDOW_PERCENTILES) if values.size else (0.0, 1.0)
    if not hi > lo:  # a constant image, or a label map under the contours
        lo, hi = float(values.min(initial=0.0)), float(values.max(initial=1.0))
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def _overlay(path: Path, title: str, under: np.ndarray, ref: np.ndarray, pred: np.ndarray, affine: np.ndarray) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    planes = overlay_slices(ref, pred, affine)
    vmin, vmax = _window(under)
    fig = Figure(figsize=(12, 4.4))
    for ax, (name, normal) in zip(fig.subplots(1, 3), VIEWS):
        img2d, aspect, horizontal, vertical = _plane(under, affine, planes[name], normal)
        ax.imshow(img2d, cmap="gray", origin="lower", aspect=aspect, interpolation="nearest", vmin=vmin, vmax=vmax)
        missing = []
        for mask, colour, width, what in (
            (ref, REF_COLOUR, REF_WIDTH, "reference"),
            (pred, PRED_COLOUR, PRED_WIDTH, "prediction"),
        ):
            m2d = _plane(mask.astype(np.float32), affine, planes[name], normal)[0]
            if m2d.min() < 0.5 < m2d.max() and min(m2d.shape) >= 2:  # contour needs a crossing
                ax.contour(m2d, levels=[0.5], colors=colour, linewidths=width)
            if mask.any() and not m2d.any():
                missing.append(what)
        ax.set_title(f"{name}, slice {planes[name]}" + (f" (no {' or '.join(missing)} here)" if missing else ""))
        left, right = EDGE_LETTERS[horizontal]
        bottom, top = UP_LETTERS[vertical]
        for x, y, letter, ha, va in (
            (0.01, 0.5, left, "left", "center"),
            (0.99, 0.5, right, "right", "center"),
            (0.5, 0.01, bottom, "center", "bottom"),
            (0.5, 0.99, top, "center", "top"),
        ):
            ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=10, weight="bold")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [
        Line2D([], [], color=REF_COLOUR, linewidth=REF_WIDTH, label="reference"),
        Line2D([], [], color=PRED_COLOUR, linewidth=PRED_WIDTH, label="prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2)
    fig.suptitle(title)
    return _save(fig, path)


def _file_word(key: str) -> str:
    """A label or region name as part of a file name: "ET/TC" is no folder."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)


def write_overlays(
    result: EvaluationResult,
    folder: Path,
    refs: Mapping[str, Path],
    preds: Mapping[str, Path],
    image_dir: Path | None,
    worst_k: int,
) -> list[Path]:
    """Overlay PNGs ``<case>_label-<label or region>.png`` for the ``worst_k`` worst cases of each."""
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
    words: dict[str, str] = {}  # structure -> its word in file names, one word per structure
    for key in worst:
        word = _file_word(key)
        while word in words.values():  # "ET/TC" and "ET_TC" would share a file
            word += "_"
        words[key] = word
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
                what = f"region {key}" if key in result.regions else f"label {result.named(key)}"
                title = f"{cid}, {what}: Dice {m[0]:.3f}, HD95 {m[1]:.2f} mm{note}"
                labels = result.regions.get(key) or int(key)
                ref_mask, pred_mask = structure_mask(ref.array, labels), structure_mask(pred.array, labels)
                written.append(
                    _overlay(
                        folder / fit_name(f"{cid}_label-{words[key]}.png"),
                        title,
                        under,
                        ref_mask,
                        pred_mask,
                        ref.affine,
                    )
                )
            except MedgnError as exc:
                log.warning("no overlay for %s, label %s: %s", cid, key, exc.one_line())
    return written
