"""MSD 4D multi-channel images: verify, plan, train, infer and evaluate through the CLI.

The fixture stacks BraTS2013mini's two channels (FLAIR, T1c) into one 4D NIfTI per case, cropped
around the tumour and downsampled so the whole pipeline runs in seconds, with an MSD
``dataset.json`` declaring ``modality`` {"0": "FLAIR", "1": "T1c"}. The bad inputs (a 4D label, a
channel count that disagrees with ``modality``, a 4D file where one channel is expected) are built
from the same files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgn.cli import main
from medgn.data.datasets import load_dataset
from medgn.data.multichannel import read_case_images, read_display_volume

TINY = [
    "--set", "model.features=[4,8]", "--set", "plan.patch_size=[16,16,16]", "--set", "plan.n_folds=2",
    "--set", "data.num_workers=0", "--set", "train.amp=off", "--set", "train.optimizer=adamw",
    "--set", "train.lr=0.01", "--set", "train.val_every=1", "--set", "train.log_every=1",
    "--set", "train.checkpoint_every_minutes=0", "--set", "train.epochs=1", "--set", "train.iters_per_epoch=3",
    "--no-progress", "--device", "cpu",
]  # fmt: skip
# Downsampling factor and crop: 240x240x155 at 1 mm -> 4 mm voxels around the brain, 24^3 voxels,
# so reading, planning and a few training steps take seconds.
STEP = 4
CROP = (slice(24, 216), slice(24, 216), slice(30, 126))


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, path)


def make_msd_4d(brats: Path, root: Path) -> Path:
    """An MSD dataset with one (X, Y, Z, 2) NIfTI per case from BraTS2013mini's two channel files."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    desc = json.loads((brats / "dataset.json").read_text())
    training = []
    for label_file in sorted((brats / "labelsTr").glob("*.nii.gz")):
        case = label_file.name[: -len(".nii.gz")]
        channels = [nib.load(brats / "imagesTr" / f"{case}_{c:04d}.nii.gz") for c in range(2)]
        affine = channels[0].affine.copy()
        sub = tuple(slice(s.start, s.stop, STEP) for s in CROP)
        origin = affine[:3, :3] @ np.array([s.start for s in CROP]) + affine[:3, 3]
        affine[:3, :3] = affine[:3, :3] * STEP
        affine[:3, 3] = origin
        stacked = np.stack([np.asanyarray(c.dataobj)[sub] for c in channels], axis=-1).astype(np.float32)
        label = np.asanyarray(nib.load(label_file).dataobj)[sub].astype(np.uint8)
        _save(stacked, affine, root / "imagesTr" / f"{case}.nii.gz")
        _save(label, affine, root / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    shutil.copy(root / "imagesTr" / f"{case}.nii.gz", root / "imagesTs" / "test_case.nii.gz")
    labels = {str(v): k for k, v in desc["labels"].items()}
    (root / "dataset.json").write_text(json.dumps({
        "name": "BraTS4D", "modality": {"0": "FLAIR", "1": "T1c"}, "labels": labels,
        "numTraining": len(training), "training": training, "test": ["./imagesTs/test_case.nii.gz"],
    }))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def msd4d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    brats = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "BraTS2013mini"
    if not brats.is_dir():
        pytest.skip(f"real data not found at {brats}")
    return make_msd_4d(brats, tmp_path_factory.mktemp("msd4d") / "BraTS4D")


@pytest.mark.data
def test_4d_case_reads_as_channels_in_modality_order(msd4d: Path) -> None:
    index = load_dataset(msd4d)
    assert index.channel_names == ("FLAIR", "T1c") and index.modalities == ("MR", "MR")
    case = index.cases[0]
    vols = read_case_images(case.images, 2)
    stacked = np.asanyarray(nib.load(case.images[0]).dataobj)
    assert len(vols) == 2 and vols[0].shape == stacked.shape[:3]
    np.testing.assert_array_equal(vols[1].array, stacked[..., 1])  # channel 1 = "T1c" = 4th-axis index 1
    np.testing.assert_allclose(vols[0].affine, nib.load(case.images[0]).affine)
    np.testing.assert_array_equal(read_display_volume(case.images[0]).array, stacked[..., 0])  # overlays: channel 0


@pytest.mark.data
@pytest.mark.slow
def test_4d_dataset_end_to_end_through_the_cli(msd4d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(msd4d)]) == 0
    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(msd4d), "--out", str(plan_path)]) == 0
    plan = json.loads(plan_path.read_text())
    assert plan["in_channels"] == 2 and len(plan["normalization"]) == 2
    assert [c["name"] for c in plan["fingerprint"]["channels"]] == ["FLAIR", "T1c"]
    assert plan["fingerprint"]["cases"][0]["shape"] == [48, 48, 24]  # the 3D grid of the 4D file, RAS order
    run = tmp_path / "run"
    assert main(["train", "--data", str(msd4d), "--out", str(run), *TINY]) == 0
    assert json.loads((run / "plan.json").read_text())["in_channels"] == 2
    # A single 4D file, and the dataset's test list.
    test_file = msd4d / "imagesTs" / "test_case.nii.gz"
    out = tmp_path / "masks"
    assert main(["infer", "--model", str(run), "--input", str(test_file), "--output", str(out), "--no-progress"]) == 0
    mask = nib.load(out / "test_case.nii.gz")
    src = nib.load(test_file)
    assert mask.ndim == 3 and mask.shape == src.shape[:3]
    np.testing.assert_allclose(mask.affine, src.affine, atol=1e-5)
    assert int(mask.header["dim"][0]) == 3
    out_ds = tmp_path / "masks_ds"
    assert main(["infer", "--model", str(run), "--input", str(msd4d), "--output", str(out_ds), "--no-progress"]) == 0
    assert (out_ds / "test_case.nii.gz").is_file()
    # evaluate with the 4D images as the overlay background
    ref = tmp_path / "ref"
    ref.mkdir()
    last_label = sorted((msd4d / "labelsTr").glob("*.nii.gz"))[-1]
    shutil.copy(last_label, ref / "test_case.nii.gz")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(test_file, images / "test_case.nii.gz")
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(out),
                "--ref",
                str(ref),
                "--out",
                str(tmp_path / "eval"),
                "--images",
                str(images),
                "--worst-k",
                "1",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["counts"]["evaluated"] == 1 and summary["counts"]["failed"] == 0
    assert list((tmp_path / "eval" / "overlays").glob("*.png"))


def _rewrite(path: Path, array: np.ndarray) -> None:
    img = nib.load(path)
    _save(array, img.affine, path)


@pytest.mark.data
def test_4d_label_is_refused_naming_the_file(msd4d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = shutil.copytree(msd4d, tmp_path / "bad")
    label = sorted((bad / "labelsTr").glob("*.nii.gz"))[0]
    arr = np.asanyarray(nib.load(label).dataobj)
    _rewrite(label, np.stack([arr, arr], axis=-1))
    assert main(["verify", str(bad)]) == 3
    err = capsys.readouterr().err
    assert str(label) in err and "expected 3D" in err


@pytest.mark.data
@pytest.mark.parametrize("channels", [1, 3])
def test_channel_count_disagreeing_with_modality_is_refused(
    msd4d: Path, tmp_path: Path, channels: int, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = shutil.copytree(msd4d, tmp_path / "bad")
    image = sorted((bad / "imagesTr").glob("*.nii.gz"))[0]
    arr = np.asanyarray(nib.load(image).dataobj)
    _rewrite(image, np.concatenate([arr, arr[..., :1]], axis=-1) if channels == 3 else arr[..., 0])
    assert main(["verify", str(bad)]) == 3
    err = capsys.readouterr().err
    assert str(image) in err and f"{channels} channel(s)" in err and "2 channel(s)" in err


@pytest.mark.data
def test_4d_file_where_one_channel_is_expected_stays_refused(
    msd4d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = tmp_path / "plain"
    (folders / "images").mkdir(parents=True)
    (folders / "labels").mkdir()
    case = sorted((msd4d / "imagesTr").glob("*.nii.gz"))[0]
    shutil.copy(case, folders / "images" / case.name)
    shutil.copy(msd4d / "labelsTr" / case.name, folders / "labels" / case.name)
    assert main(["verify", str(folders)]) == 3
    assert "expected 3D" in capsys.readouterr().err
