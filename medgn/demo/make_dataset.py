"""Build the demo dataset: several synthetic "subjects" from the MNI152 template shipped in nilearn.

The MNI152 2009a T1 template and its grey- and white-matter probability maps come inside the
``nilearn`` wheel (the ``demo`` extra), so nothing is downloaded at run time. Each subject is the
template resampled to a coarser grid, then warped by a random affine + elastic deformation, given a
smooth multiplicative bias field, a global intensity change and Rician-like noise (MONAI
transforms, seeded per subject). Labels: 0 background, 1 grey matter, 2 white matter, taken as the
more probable tissue where its probability is at least one half. The result is a Medical
Segmentation Decathlon folder (``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``,
``labelsTs``) that ``medgn verify/plan/train/infer/evaluate`` use like any user dataset.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medgn.errors import UsageError
from medgn.files import atomic_write_json, atomic_write_with

# Tissue probability (0-255 in the template) above which a voxel belongs to GM or WM: one half.
_TISSUE_THRESHOLD = 127.5


def _template_paths() -> tuple[Path, Path, Path]:
    try:
        from nilearn import datasets
    except ImportError as exc:  # pragma: no cover - depends on the extra being installed
        raise UsageError("nilearn", "the demo needs the 'demo' extra", expected="pip install -e '.[demo]'") from exc
    return Path(datasets.MNI152_FILE_PATH), Path(datasets.GM_MNI152_FILE_PATH), Path(datasets.WM_MNI152_FILE_PATH)


def load_template(spacing_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T1 (float32, 0-1), labels (uint8) and the affine of the template resampled to ``spacing_mm``.

    Returns:
        (t1, labels, affine) with t1 and labels of shape (X, Y, Z) cropped to the head's bounding box.
    """
    t1_path, gm_path, wm_path = _template_paths()
    t1_img = nib.load(t1_path)
    t1 = np.asanyarray(t1_img.dataobj).astype(np.float32) / 255.0
    gm = np.asanyarray(nib.load(gm_path).dataobj).astype(np.float32)
    wm = np.asanyarray(nib.load(wm_path).dataobj).astype(np.float32)
    labels = np.zeros(t1.shape, dtype=np.uint8)
    labels[(gm >= _TISSUE_THRESHOLD) & (gm >= wm)] = 1
    labels[(wm >= _TISSUE_THRESHOLD) & (wm > gm)] = 2
    # Crop to the head (nonzero T1) with a small margin, then resample by area averaging.
    nz = np.argwhere(t1 > 0.02)
    lo = np.maximum(nz.min(0) - 4, 0)
    hi = np.minimum(nz.max(0) + 5, t1.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    t1, labels = t1[sl], labels[sl]
    factor = float(spacing_mm) / float(t1_img.header.get_zooms()[0])
    size = [max(8, int(round(s / factor))) for s in t1.shape]
    t1_t = torch.from_numpy(t1)[None, None]
    t1_small = torch.nn.functional.interpolate(t1_t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), 3).permute(3, 0, 1, 2)[None].float()
    lab_small = torch.nn.functional.interpolate(onehot, size=size, mode="trilinear", align_corners=False)[0].argmax(0)
    affine = t1_img.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    affine[:3, :3] = affine[:3, :3] * factor
    # Keep the world centre of the first voxel consistent with the coarser grid.
    affine[:3, 3] += affine[:3, :3] @ np.full(3, 0.5) - t1_img.affine[:3, :3] @ np.full(3, 0.5)
    return t1_small.astype(np.float32), lab_small.numpy().astype(np.uint8), affine


def make_subject(t1: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One randomly deformed, bias-corrupted, noisy subject (image float32, labels uint8)."""
    from monai.transforms import (
        Compose,
        RandAffined,
        RandBiasFieldd,
        RandGaussianNoised,
        RandRicianNoised,
        RandScaleIntensityd,
    )

    data = {"image": torch.from_numpy(t1)[None], "label": torch.from_numpy(labels.astype(np.float32))[None]}
    spatial = RandAffined(
        keys=("image", "label"),
        prob=1.0,
        rotate_range=(0.12, 0.12, 0.12),  # about +-7 degrees: head positioning differences
        scale_range=(0.08, 0.08, 0.08),  # +-8 %: head size differences between subjects
        translate_range=(3, 3, 3),
        mode=("bilinear", "nearest"),
        padding_mode="zeros",
    )
    intensity = Compose(
        [
            RandBiasFieldd(keys="image", prob=1.0, degree=3, coeff_range=(0.1, 0.3)),
            RandScaleIntensityd(keys="image", prob=1.0, factors=0.2),
            RandGaussianNoised(keys="image", prob=1.0, std=0.02),
            RandRicianNoised(keys="image", prob=0.5, std=0.02),
        ]
    )
    spatial.set_random_state(seed=seed)
    intensity.set_random_state(seed=seed + 1)
    out = intensity(spatial(data))
    image = np.clip(np.asarray(out["image"][0], dtype=np.float32), 0, None) * 1000.0  # MR-like scale
    return image.astype(np.float32), np.asarray(out["label"][0]).round().astype(np.uint8)


def build_demo_dataset(
    out: str | Path, n_train: int = 6, n_test: int = 2, spacing_mm: float = 3.0, seed: int = 0
) -> Path:
    """Write the demo dataset in MSD layout under ``out`` and return its path.

    Args:
        out: destination folder (created; existing files are replaced).
        n_train: training subjects (with labels in labelsTr).
        n_test: held-out subjects (images in imagesTs, reference labels in labelsTs).
        spacing_mm: isotropic voxel size; 3 mm keeps CPU training to minutes.
        seed: base seed; subject i uses seed + 1000 * i.
    """
    if n_train < 2 or n_test < 1:
        raise UsageError(
            "n_train/n_test", "too few subjects", got=(n_train, n_test), expected="n_train >= 2, n_test >= 1"
        )
    out = Path(out)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    t1, labels, affine = load_template(spacing_mm)
    training, test = [], []
    for i in range(n_train + n_test):
        image, label = make_subject(t1, labels, seed + 1000 * i)
        name = f"mni_{i:03d}.nii.gz"
        split = ("imagesTr", "labelsTr") if i < n_train else ("imagesTs", "labelsTs")
        for folder, array, dtype in ((split[0], image, np.float32), (split[1], label, np.uint8)):
            img = nib.Nifti1Image(array.astype(dtype), affine)
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            atomic_write_with(out / folder / name, lambda p, img=img: nib.save(img, p))
        if i < n_train:
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
    atomic_write_json(
        out / "dataset.json",
        {
            "name": "MNI152-demo",
            "description": "Deformed MNI152 2009a T1 subjects with grey/white-matter labels (nilearn template)",
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "grey_matter", "2": "white_matter"},
            "numTraining": len(training),
            "numTest": len(test),
            "training": training,
            "test": test,
        },
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the medgn demo dataset from the MNI152 template.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=6)
    parser.add_argument("--test", type=int, default=2)
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_demo_dataset(args.out, args.train, args.test, args.spacing, args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
