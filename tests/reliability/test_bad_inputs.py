"""Every bad input of RELIABILITY.md through the CLI: the right exit code, one precise line, nothing written.

Single images go through ``medgn infer`` (in-process for speed, and all of them together in one
subprocess so the exit code and stderr of a real process are checked too); labels, geometry and
``dataset.json`` problems through ``medgn verify``, ``plan``, ``train`` and ``evaluate``; file names
with odd characters and case ids that try to leave the output folder; refused output folders.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medgn.data.io import read_header
from medgn.errors import UsageError
from tests.reliability.conftest import (
    AFFINE,
    SHAPE,
    Result,
    assert_clean_failure,
    cli,
    dicom_series,
    image_array,
    label_array,
    make_msd,
    patch_nifti,
    patch_nifti_fields,
    raw_mha,
    raw_nrrd,
    run_medgn,
    tree_hashes,
    truncate,
    write_image,
    write_itk,
    write_nifti,
)

NAN, INF = float("nan"), float("inf")


def _nifti(folder: Path, name: str, array: np.ndarray | None = None) -> Path:
    return write_nifti(folder / name, image_array() if array is None else array)


def _rgb() -> np.ndarray:
    return np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])


def _bytes(folder: Path, name: str, data: bytes) -> Path:
    (folder / name).write_bytes(data)
    return folder / name


def _renamed_plain(folder: Path, name: str) -> Path:
    """An uncompressed ``.nii`` saved under a ``.nii.gz`` name."""
    plain = write_nifti(folder / "plain_tmp.nii", image_array())
    return Path(os.replace(plain, folder / name) or folder / name)


def _with_nan() -> np.ndarray:
    array = image_array()
    array[0, 0, 0], array[3, 3, 3] = np.nan, np.inf
    return array


def _restream(path: Path, damage: str) -> Path:
    """A compressed MHA (as SimpleITK writes it) whose zlib stream is cut, or complete but short."""
    import re
    import zlib

    raw = path.read_bytes()
    end = re.search(rb"ElementDataFile = LOCAL\r?\n", raw).end()
    data = zlib.decompress(raw[end:])
    stream = zlib.compress(data[: len(data) // 3]) if damage == "short" else raw[end : end + (len(raw) - end) // 2]
    path.write_bytes(raw[:end] + stream)
    return path


# (file name, builder(folder, name) -> path, exit code, words the error line must contain)
UNIT_DIRECTIONS = "space directions: (1,0,0) (0,1,0) (0,0,1)\n"
BAD_IMAGES: list[tuple[str, Callable[[Path, str], Path], int, list[str]]] = [
    ("empty.nii.gz", lambda f, n: _bytes(f, n, b""), 3, ["empty"]),
    ("random.nii.gz", lambda f, n: _bytes(f, n, np.random.default_rng(0).bytes(3000)), 3, ["gzip"]),
    ("noise.mha", lambda f, n: _bytes(f, n, np.random.default_rng(1).bytes(3000)), 3, ["cannot read the image header"]),
    ("plain.nii.gz", _renamed_plain, 3, ["gzip", "uncompressed"]),
    ("cut_gz.nii.gz", lambda f, n: truncate(_nifti(f, n)), 3, ["truncated"]),
    ("cut_nii.nii", lambda f, n: truncate(_nifti(f, n)), 3, ["truncated"]),
    ("cut_nrrd.nrrd", lambda f, n: truncate(write_itk(f / n, image_array())), 3, ["truncated or corrupt"]),
    ("cut_mha.mha", lambda f, n: truncate(write_itk(f / n, image_array())), 3, ["truncated or corrupt"]),
    # ITK reads both as a whole image, the missing voxels zero, without a word.
    (
        "short_stream.mha",
        lambda f, n: _restream(write_itk(f / n, image_array()), "short"),
        3,
        ["compressed voxel data are truncated or corrupt", "expected 2880 bytes"],
    ),
    (
        "cut_stream.mha",
        lambda f, n: _restream(write_itk(f / n, image_array()), "cut"),
        3,
        ["compressed voxel data are truncated or corrupt", "stream unfinished"],
    ),
    (
        "huge.nii.gz",
        lambda f, n: patch_nifti(_nifti(f, n), "dim", (3, 30000, 30000, 30000, 1, 1, 1, 1)),
        5,
        ["above the limit", "30000"],
    ),
    (
        "many.nii.gz",
        lambda f, n: patch_nifti(_nifti(f, n), "dim", (3, 4000, 4000, 4000, 1, 1, 1, 1)),
        5,
        ["too many voxels"],
    ),
    ("huge_nrrd.nrrd", lambda f, n: raw_nrrd(f / n, (30000, 30000, 30000)), 5, ["above the limit"]),
    ("huge_mha.mha", lambda f, n: raw_mha(f / n, (4000, 4000, 4000)), 5, ["too many voxels"]),
    ("no_space.nrrd", lambda f, n: raw_nrrd(f / n, (4, 4, 4), fields=""), 3, ["no orientation", "'space' field"]),
    (
        "scanner_space.nrrd",
        lambda f, n: raw_nrrd(
            f / n, (4, 4, 4), fields="space: scanner-xyz\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
        ),
        3,
        ["no patient orientation", "space: scanner-xyz", "anatomical space"],
    ),
    (
        "handed_space.nrrd",
        lambda f, n: raw_nrrd(f / n, (4, 4, 4), fields="space: 3D-right-handed\n" + UNIT_DIRECTIONS),
        3,
        ["no patient orientation", "space: 3D-right-handed"],
    ),
    (
        "flat_nrrd.nrrd",
        lambda f, n: raw_nrrd(
            f / n, (4, 4, 4), fields="space: left-posterior-superior\nspace directions: (0,0,0) (0,1,0) (0,0,1)\n"
        ),
        3,
        ["spacing"],
    ),
    (
        "zero_spacing.nii.gz",
        lambda f, n: patch_nifti(_nifti(f, n), "pixdim", (1, 0, 1.25, 2, 1, 1, 1, 1)),
        3,
        ["spacing", "pixdim"],
    ),
    (
        "neg_spacing.nii.gz",
        lambda f, n: patch_nifti(_nifti(f, n), "pixdim", (1, -1.5, 1.25, 2, 1, 1, 1, 1)),
        3,
        ["spacing", "-1.5"],
    ),
    (
        "nan_spacing.nii.gz",
        lambda f, n: patch_nifti(_nifti(f, n), "pixdim", (1, NAN, 1.25, 2, 1, 1, 1, 1)),
        3,
        ["spacing", "nan"],
    ),
    (
        "singular.nii.gz",
        lambda f, n: patch_nifti_fields(_nifti(f, n), {"srow_x": (0, 0, 0, 0), "qform_code": 0}),
        3,
        ["singular"],
    ),
    (
        "nan_affine.nii.gz",
        lambda f, n: patch_nifti_fields(_nifti(f, n), {"srow_y": (0, NAN, 0, 0)}),
        3,
        ["affine", "not finite"],
    ),
    (
        "no_orientation.nii.gz",
        lambda f, n: patch_nifti_fields(_nifti(f, n), {"qform_code": 0, "sform_code": 0}),
        3,
        ["no orientation", "sform_code=0"],
    ),
    (
        "bad_code.nii.gz",
        lambda f, n: patch_nifti_fields(_nifti(f, n), {"sform_code": 9}),
        3,
        ["orientation code", "sform_code=9"],
    ),
    (
        "xforms_differ.nii.gz",
        lambda f, n: patch_nifti_fields(_nifti(f, n), {"qoffset_x": 0.0}),
        3,
        ["qform and sform disagree"],
    ),
    (
        "pixdim_vs_sform.nii.gz",
        lambda f, n: patch_nifti(_nifti(f, n), "pixdim", (1, 2, 2, 2, 1, 1, 1, 1)),
        3,
        ["pixdim", "sform"],
    ),
    ("bad_offset.nii.gz", lambda f, n: patch_nifti_fields(_nifti(f, n), {"vox_offset": -100}), 3, ["vox_offset"]),
    (
        "four_d.nii.gz",
        lambda f, n: _nifti(f, n, np.zeros((*SHAPE, 2), np.float32)),
        3,
        ["expected 3D, got shape (10, 9, 8, 2)"],
    ),
    ("two_d.nii.gz", lambda f, n: _nifti(f, n, np.zeros(SHAPE[:2], np.float32)), 3, ["expected 3D, got shape (10, 9)"]),
    (
        "five_d.nii.gz",
        lambda f, n: _nifti(f, n, np.zeros((*SHAPE, 1, 2), np.float32)),
        3,
        ["expected 3D, got shape (10, 9, 8, 1, 2)"],
    ),
    (
        "complex.nii.gz",
        lambda f, n: _nifti(f, n, np.zeros(SHAPE, np.complex64)),
        3,
        ["unsupported data type", "complex"],
    ),
    ("rgb.nii.gz", lambda f, n: _nifti(f, n, _rgb()), 3, ["unsupported data type"]),
    (
        "bool.nii.gz",
        lambda f, n: patch_nifti_fields(_nifti(f, n, label_array()), {"datatype": 1, "bitpix": 1}),
        3,
        ["unsupported data type"],
    ),
    ("nan_voxels.nii.gz", lambda f, n: _nifti(f, n, _with_nan()), 3, ["2 NaN/Inf voxels"]),
    (
        "overflow.nii.gz",
        lambda f, n: patch_nifti_fields(_nifti(f, n), {"scl_slope": 1e38}),
        3,
        ["NaN/Inf voxels", "scl_slope"],
    ),
    (
        "nan_inter.nii.gz",
        lambda f, n: patch_nifti_fields(_nifti(f, n), {"scl_slope": 1.0, "scl_inter": NAN}),
        3,
        ["intensity scaling", "scl_inter=nan"],
    ),
    (
        "inf_slope.nii.gz",
        lambda f, n: patch_nifti_fields(_nifti(f, n), {"scl_slope": float("inf")}),
        3,
        ["intensity scaling", "scl_slope=inf"],
    ),
    ("bad_magic.nii.gz", lambda f, n: patch_nifti(_nifti(f, n), "magic", b"xyz\0"), 3, ["magic", "b'xyz'"]),
    ("n2_magic.nii", lambda f, n: patch_nifti(_nifti(f, n), "magic", b"n+2\0"), 3, ["magic", "b'n+2'"]),
]
IDS = [name for name, *_ in BAD_IMAGES]


def _mask_name(name: str) -> str:
    return name if name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")) else name + ".nii.gz"


@pytest.fixture(scope="module")
def earlier_outputs(model_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output folder holding an earlier run's mask and sidecar for case ``earlier``."""
    from medgn.cli import main
    from medgn.logs import detach_file_logs

    root = tmp_path_factory.mktemp("earlier")
    scan = write_nifti(root / "earlier.nii.gz", image_array())
    assert (
        main(["infer", "--model", str(model_run), "--input", str(scan), "--output", str(root / "out"), "--no-progress"])
        == 0
    )
    detach_file_logs()
    return root / "out"


@pytest.mark.parametrize(("name", "build", "code", "words"), BAD_IMAGES, ids=IDS)
def test_bad_image_is_refused_by_infer(
    tmp_path: Path,
    model_run: Path,
    earlier_outputs: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    build: Callable[[Path, str], Path],
    code: int,
    words: list[str],
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    path = build(inputs, name)
    before = {inputs: tree_hashes(inputs)}
    out = Path(shutil.copytree(earlier_outputs, tmp_path / "out"))
    earlier = {k: v for k, v in tree_hashes(out).items() if k != "report.json"}  # the report is per run
    result = cli(["infer", "--model", model_run, "--input", path, "--output", out, "--no-progress"], capsys)
    assert_clean_failure(
        result,
        code,
        [path],
        words,
        outputs=[out / _mask_name(name), out / (name.split(".")[0] + ".json"), out],
        before=before,
    )
    assert {k: v for k, v in tree_hashes(out).items() if k != "report.json"} == earlier


def test_dicom_two_series_and_missing_slice(
    tmp_path: Path, model_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    two = dicom_series(tmp_path / "two", image_array())
    dicom_series(two, image_array(), series_uid="1.2.826.0.1.3680043.2.1125.2")
    gap = dicom_series(tmp_path / "gap", image_array(), skip=[3])
    same = dicom_series(tmp_path / "same", image_array(), spacing=1e-6)  # every slice at one position
    for folder, words in (
        (two, ["2 DICOM series", "1125.1 (8 files)", "1125.2 (8 files)"]),
        (gap, ["missing", "4.000->8.000 mm"]),
        (same, ["DICOM series has 8 of its 8 slices at the same position"]),
    ):
        before = {folder: tree_hashes(folder)}
        out = tmp_path / f"out_{folder.name}"
        result = cli(["infer", "--model", model_run, "--input", folder, "--output", out, "--no-progress"], capsys)
        assert_clean_failure(
            result,
            3,
            [folder],
            words,
            outputs=[out / f"{folder.name}.nii.gz", out / f"{folder.name}.json", out],
            before=before,
        )
    ok = dicom_series(tmp_path / "ok", image_array())
    result = cli(
        ["infer", "--model", model_run, "--input", ok, "--output", tmp_path / "out_ok", "--no-progress"], capsys
    )
    assert result.code == 0, result.err
    assert (tmp_path / "out_ok" / "ok.nii.gz").is_file()


def test_all_bad_images_in_one_folder_through_a_real_process(tmp_path: Path, model_run: Path) -> None:
    """One subprocess over every bad image and a good one: each bad file named once, the good one done."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    paths = [build(inputs, name) for name, build, _, _ in BAD_IMAGES]
    good = write_nifti(inputs / "good.nii.gz", image_array())
    before = {inputs: tree_hashes(inputs)}
    out = tmp_path / "out"
    result = run_medgn(["infer", "--model", model_run, "--input", inputs, "--output", out, "--no-progress"])
    assert_clean_failure(
        result, 5, paths, [], outputs=[out / _mask_name(p.name) for p in paths], before=before, error_lines=len(paths)
    )
    assert (out / good.name).is_file() and (out / "good.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"ok": 1, "skipped": 0, "failed": len(paths)}
    assert {c["case_id"]: c["code"] for c in report["cases"] if c["status"] == "failed"} == {
        n.split(".")[0]: code for n, _, code, _ in BAD_IMAGES
    }


def test_two_files_for_one_case_are_refused_not_skipped(
    tmp_path: Path, model_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for names in (["a.nii.gz", "a.nrrd"], ["b_0000.nii.gz", "b_0000.mha"]):
        inputs = tmp_path / names[0].split(".")[0]
        inputs.mkdir()
        for name in names:
            write_image(inputs / name, image_array())
        out = tmp_path / f"out_{inputs.name}"
        result = cli(["infer", "--model", model_run, "--input", inputs, "--output", out, "--no-progress"], capsys)
        assert_clean_failure(result, 3, [inputs, *names], ["two files for"], outputs=[out])
        assert not list(out.glob("*.nii.gz")) if out.exists() else True


def test_constant_image_is_handled_without_nan(
    tmp_path: Path, model_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A constant image normalises to zeros (documented safe handling): a finite, all-one-class mask."""
    import nibabel as nib

    path = write_nifti(tmp_path / "const.nii.gz", np.full(SHAPE, 7.0, np.float32))
    result = cli(
        [
            "infer",
            "--model",
            model_run,
            "--input",
            path,
            "--output",
            tmp_path / "out",
            "--save-probabilities",
            "--no-progress",
        ],
        capsys,
    )
    assert result.code == 0, result.err
    mask = np.asanyarray(nib.load(tmp_path / "out" / "const.nii.gz").dataobj)
    assert mask.shape == SHAPE and len(np.unique(mask)) == 1  # one input value -> one class everywhere
    probs = np.load(tmp_path / "out" / "const_probabilities.npz")
    assert all(np.isfinite(probs[k].astype(np.float32)).all() for k in probs.files)


def _broken_labels(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """An 8-case MSD dataset whose labels c1..c6 are each broken in one way."""
    make_msd(root, 8)
    labels, images = root / "labelsTr", root / "imagesTr"
    spacing, origin, direction = AFFINE.copy(), AFFINE.copy(), AFFINE.copy()
    spacing[0, 0] = 1.6
    origin[1, 3] += 1.0
    direction[0, 0] = -1.5
    cases = {
        "c1": (write_nifti(labels / "c1.nii.gz", image_array()), ["non-integer", "is this an image?"]),
        "c2": (
            write_nifti(labels / "c2.nii.gz", label_array() * 3),
            ["outside the declared set: [3]", "expected values in [0, 1]"],
        ),
        "c3": (write_nifti(labels / "c3.nii.gz", label_array((10, 9, 7))), ["shape (10, 9, 8) vs (10, 9, 7)"]),
        "c4": (write_nifti(labels / "c4.nii.gz", label_array(), spacing), ["spacing (1.5, 1.25, 2) vs (1.6, 1.25, 2)"]),
        "c5": (write_nifti(labels / "c5.nii.gz", label_array(), origin), ["origin (-7, 3.5, 11) vs (-7, 4.5, 11)"]),
        "c6": (write_nifti(labels / "c6.nii.gz", label_array(), direction), ["direction"]),
    }
    for cid in ("c3", "c4", "c5", "c6"):
        cases[cid][1].append(str(images / f"{cid}.nii.gz"))  # both paths
    return cases


def test_verify_lists_every_bad_label_and_geometry_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ds"
    cases = _broken_labels(root)
    before = {root: tree_hashes(root)}
    result = cli(["verify", root], capsys)
    assert_clean_failure(result, 3, [root], ["6 problem(s) in 6 of 8 cases"], before=before)
    problems = [line for line in result.err.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 6, result.err
    for path, words in cases.values():
        line = next(p for p in problems if str(path) in p)
        assert all(w in line for w in words), (line, words)


def test_train_plan_and_evaluate_refuse_bad_labels_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "ds"
    cases = _broken_labels(root)
    before = {root: tree_hashes(root)}
    plan = tmp_path / "plan.json"
    result = cli(["plan", root, "--out", plan], capsys)
    assert_clean_failure(
        result, 3, [cases["c1"][0]], ["non-integer"], outputs=[plan, plan.with_name("splits.json")], before=before
    )
    # The same 8 cases with good labels: their plan and folds must survive a failed --overwrite.
    assert cli(["plan", make_msd(tmp_path / "good", 8), "--out", plan, "--folds", "2"], capsys).code == 0
    earlier = tree_hashes(tmp_path / "plan.json") | tree_hashes(tmp_path / "splits.json")
    result = cli(["plan", root, "--out", plan, "--overwrite"], capsys)
    assert_clean_failure(result, 3, [cases["c1"][0]], ["non-integer"], before=before)
    assert tree_hashes(tmp_path / "plan.json") | tree_hashes(tmp_path / "splits.json") == earlier
    out = tmp_path / "run"
    result = run_medgn(["train", "--data", root, "--out", out, "--device", "cpu", "--no-progress"])
    assert_clean_failure(result, 3, [root, cases["c1"][0]], ["verification"], before=before)
    assert not (out / "checkpoints").exists()
    ev = tmp_path / "eval"
    result = cli(["evaluate", "--pred", root / "labelsTr", "--ref", root / "labelsTr", "--out", ev], capsys)
    # Batch evaluation goes on past a bad case and records it as failed in its report.
    assert_clean_failure(result, 3, [cases["c1"][0]], ["non-integer"], outputs=[ev], before=before)
    assert list(json.loads((ev / "summary.json").read_text())["failures"]) == ["c1"]


def test_dataset_json_problems_are_all_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_msd(tmp_path / "ds", 3)
    desc = json.loads((root / "dataset.json").read_text())
    desc["labels"] = {"0": "background", "1": "a", "3": "b"}
    desc["numTraining"] = 5
    del desc["modality"]
    desc["training"].append({"image": "./imagesTr/c9.nii.gz", "label": "./labelsTr/c9.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(desc))
    (root / "labelsTr" / "c2.nii.gz").unlink()
    before = {root: tree_hashes(root)}
    result = cli(["verify", root], capsys)
    text = assert_clean_failure(
        result,
        3,
        [root / "dataset.json"],
        ["missing key 'modality'", "consecutive", "[0, 1, 3]"],
        before=before,
    )
    for missing in ("imagesTr/c9.nii.gz", "labelsTr/c9.nii.gz", "labelsTr/c2.nii.gz"):
        assert str(root / missing) in text, missing
    (root / "dataset.json").write_text(json.dumps({"name": "x"}))
    result = cli(["verify", root], capsys)
    assert_clean_failure(
        result, 3, [root / "dataset.json"], ["unrecognised dataset.json", "training, labels, modality"]
    )


def _nnunet(root: Path, cases: int = 3) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(cases):
        for c in range(2):
            write_nifti(root / "imagesTr" / f"case{i}_{c:04d}.nii.gz", image_array(i + c))
        write_nifti(root / "labelsTr" / f"case{i}.nii.gz", label_array())
    desc = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "a": 1},
        "numTraining": cases,
        "file_ending": ".nii.gz",
        "name": "nn",
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    return root


MALFORMED_JSON = [
    ("msd", {"test": 5}, ["'test' must be a list"]),
    ("msd", {"modality": {"\u00b2": "MRI"}}, ["'modality' must map channel numbers"]),
    ("nnunet", {"channel_names": {"\u00b2": "T1"}}, ["'channel_names' must map 0..C-1"]),
    ("nnunet", {"file_ending": 5}, ["'file_ending' must be an image file ending", "got 5"]),
    ("msd", "[" * 100000, ["nested too deeply"]),
]


@pytest.mark.parametrize(("layout", "change", "words"), MALFORMED_JSON, ids=lambda v: str(v)[:20])
@pytest.mark.parametrize("command", ["verify", "plan"])
def test_malformed_dataset_json_values_are_input_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str, change: dict | str, words: list[str], command: str
) -> None:
    """Wrong types and look-alike digits in dataset.json: exit 3 naming the file, never an internal error."""
    root = make_msd(tmp_path / "ds", 2) if layout == "msd" else _nnunet(tmp_path / "ds", 2)
    if isinstance(change, str):
        (root / "dataset.json").write_text(change)
    else:
        desc = json.loads((root / "dataset.json").read_text())
        (root / "dataset.json").write_text(json.dumps({**desc, **change}))
    before = {root: tree_hashes(root)}
    argv = [command, root] + (["--out", tmp_path / "plan.json"] if command == "plan" else [])
    result = cli(argv, capsys)
    assert_clean_failure(result, 3, [root / "dataset.json"], words, outputs=[tmp_path / "plan.json"], before=before)


def test_missing_channel_and_channels_with_different_geometry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _nnunet(tmp_path / "nn")
    (root / "imagesTr" / "case1_0001.nii.gz").unlink()
    result = cli(["verify", root], capsys)
    assert_clean_failure(result, 3, [root / "imagesTr" / "case1_0001.nii.gz"], ["channel file missing"])
    root = _nnunet(tmp_path / "nn2")
    moved = AFFINE.copy()
    moved[0, 3] += 5.0
    write_nifti(root / "imagesTr" / "case2_0001.nii.gz", image_array(), moved)
    before = {root: tree_hashes(root)}
    result = cli(["verify", root], capsys)
    assert_clean_failure(result, 3, [root], ["1 problem(s)"], before=before)
    problem = next(line for line in result.err.splitlines() if line.startswith("problem: "))
    for word in ("case2_0000.nii.gz", "case2_0001.nii.gz", "origin (-7, 3.5, 11) vs (-2, 3.5, 11)"):
        assert word in problem, problem


def test_real_volume_above_max_voxels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_msd(tmp_path / "ds", 2)
    result = cli(["verify", root, "--max-voxels", "100"], capsys)
    assert_clean_failure(result, 3, [root], ["4 problem(s) in 2 of 2 cases"])  # image and label of each case
    assert "too many voxels" in result.err and "raise it with --max-voxels" in result.err
    result = cli(["plan", root, "--out", tmp_path / "plan.json", "--max-voxels", "100"], capsys)
    assert_clean_failure(
        result, 5, [root / "imagesTr" / "c0.nii.gz"], ["too many voxels"], outputs=[tmp_path / "plan.json"]
    )


ODD_NAMES = ["with space", "ünï-cødé", "-leading", "semi;colon$(x)&`y`'q'\"", "star*?[a]"]


def test_odd_file_names_are_processed_literally_inside_the_output(tmp_path: Path, model_run: Path) -> None:
    inputs = tmp_path / "in put"
    inputs.mkdir()
    for name in ODD_NAMES:
        write_nifti(inputs / f"{name}.nii.gz", image_array())
    out = tmp_path / "out dir"
    before = tree_hashes(inputs)
    result = run_medgn(["infer", "--model", model_run, "--input", inputs, "--output", out, "--no-progress"])
    assert result.code == 0, result.err
    assert tree_hashes(inputs) == before
    expected = {("_" + n[1:] if n.startswith("-") else n) + ".nii.gz" for n in ODD_NAMES}
    assert {p.name for p in out.glob("*.nii.gz")} == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in put", "out dir"]  # nothing beside them


def _nifti_with_gap(path: Path, gap: bytes) -> Path:
    """An uncompressed NIfTI-1 whose voxels start ``len(gap)`` bytes later (vox_offset moved)."""
    import struct

    import nibabel as nib

    data = bytearray(nib.Nifti1Image(image_array(), AFFINE).to_bytes())
    struct.pack_into("<f", data, 108, 352.0 + len(gap))
    if gap[:1] != b"\0":  # an extension: the extender's flag is set
        data[348] = 1
    path.write_bytes(bytes(data[:352]) + gap + bytes(data[352:]))
    return path


def test_library_notices_and_odd_names_keep_stderr_to_one_line_per_failed_case(tmp_path: Path, model_run: Path) -> None:
    """nibabel's header notices, Python warnings, a newline in a name and a name that is not UTF-8.

    None may reach the terminal as extra lines or a logging traceback: stderr holds exactly the
    one ``medgn: error:`` line of the one bad case, with the newline escaped.
    """
    import struct

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "bad\nname.nii.gz").write_bytes(b"not an image")
    write_nifti(Path(os.fsdecode(os.fsencode(str(inputs)) + b"/caf\xe9.nii.gz")), image_array())
    _nifti_with_gap(inputs / "offset.nii", bytes(8))  # vox_offset 360: not a multiple of 16
    # A 20-byte extension (size not a multiple of 16): nibabel warns while reading it.
    _nifti_with_gap(inputs / "ext.nii", struct.pack("<ii", 20, 6) + b"x" * 12)
    out = tmp_path / "out"
    (tmp_path / "tmp").mkdir()
    argv = ["infer", "--model", model_run, "--input", inputs, "--output", out, "--no-progress"]
    result = run_medgn(argv, TMPDIR=str(tmp_path / "tmp"))  # the log file goes there
    assert result.code == 3, result.err
    assert result.err.splitlines() == [result.err.strip()], result.err
    assert result.err.startswith("medgn: error: case bad\\nname: "), result.err
    assert {p.name for p in out.glob("*.nii*")} == {"caf_.nii.gz", "offset.nii", "ext.nii"}
    log = next((tmp_path / "tmp").glob("medgn-*.log")).read_text(encoding="utf-8")
    assert "caf\\udce9" in log and "vox offset" in log, log[-2000:]


def test_case_ids_that_try_to_leave_the_output_folder(
    tmp_path: Path, model_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A dataset's test list naming ``../../x`` is refused; nothing is written anywhere."""
    root = make_msd(tmp_path / "a" / "b" / "ds", 1)
    write_nifti(tmp_path / "a" / "x.nii.gz", image_array())
    desc = json.loads((root / "dataset.json").read_text())
    desc["test"] = ["../../x.nii.gz", "./imagesTr/c0.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(desc))
    out = tmp_path / "out"
    snapshot = tree_hashes(tmp_path)
    result = cli(["infer", "--model", model_run, "--input", root, "--output", out, "--no-progress"], capsys)
    assert_clean_failure(
        result, 3, [root / "dataset.json", "'../../x.nii.gz'"], ["leaves the dataset folder"], outputs=[out]
    )
    assert {k: v for k, v in tree_hashes(tmp_path).items() if not k.startswith("out/")} == snapshot
    assert not list(out.glob("*.nii.gz")) if out.exists() else True


@pytest.mark.parametrize("where", ["equal", "inside", "unwritable"])
def test_refused_output_folder_fails_before_loading_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_nifti(inputs / "a.nii.gz", image_array())
    out = {"equal": inputs, "inside": inputs / "masks", "unwritable": tmp_path / "ro" / "out"}[where]
    if where == "unwritable":
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o500)
        if os.access(tmp_path / "ro", os.W_OK):  # root ignores permissions: a path under a file instead
            out = write_nifti(tmp_path / "ro" / "file.nii.gz", image_array()) / "out"
    before = {inputs: tree_hashes(inputs)}
    missing_model = tmp_path / "no-such-model"  # loading it would fail with code 4
    try:
        result: Result = cli(
            ["infer", "--model", missing_model, "--input", inputs, "--output", out, "--no-progress"], capsys
        )
    finally:
        os.chmod(tmp_path / "ro", 0o700) if where == "unwritable" else None
    assert_clean_failure(
        result, 2, [str(out)], ["inside the input" if where != "unwritable" else "not writable"], before=before
    )
    assert not (inputs / "masks").exists()
    assert str(missing_model) not in result.err


def test_an_input_that_is_no_file_or_folder_says_what_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A FIFO or device named like a scan (reading it would block or never end), a dangling link."""
    os.mkfifo(tmp_path / "fifo.nii.gz")
    (tmp_path / "zero.nii").symlink_to("/dev/zero")
    (tmp_path / "gone.nii.gz").symlink_to(tmp_path / "deleted.nii.gz")
    cases = {
        "fifo.nii.gz": "input is neither a regular file nor a folder",
        "zero.nii": "input is neither a regular file nor a folder",
        "gone.nii.gz": "input is a symbolic link that leads nowhere",
        "absent.nii.gz": "input not found",
    }
    for name, words in cases.items():
        argv = ["infer", "--model", tmp_path / "no-model", "--input", tmp_path / name, "--output", tmp_path / "out"]
        result: Result = cli(argv, capsys)
        assert_clean_failure(result, 2, [name], [words])
        assert not (tmp_path / "out").exists()


def test_a_refused_run_leaves_no_output_folder_behind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The folders a run created for its output are removed again when it stops before any case."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_nifti(inputs / "a.nii.gz", image_array())
    write_nifti(inputs / "b.nii.gz", image_array())
    (tmp_path / "kept").mkdir()
    runs = [
        (["--output", tmp_path / "new" / "deeper"], 4),  # the model cannot be loaded
        (["--output", tmp_path / "new2" / "m.nii.gz", "--input", inputs / "a.nii.gz"], 4),
        (["--output", tmp_path / "new3", "--shard", "0/2"], 4),  # with its shard lock folder
        (["--output", tmp_path / "new4", "--output-format", "dicom-seg"], 2),
        (["--output", tmp_path / "kept"], 4),  # a folder that was there stays
    ]
    for extra, code in runs:
        argv = ["infer", "--model", tmp_path / "no-model", "--input", inputs, *extra]
        if "--input" in extra[2:]:
            argv = ["infer", "--model", tmp_path / "no-model", *extra]
        result: Result = cli(argv, capsys)
        assert result.code == code, (extra, result.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "kept"]
    assert list((tmp_path / "kept").iterdir()) == []


def test_a_run_holds_its_new_output_folder_from_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a run scans its inputs, another run into its new folder is locked out (exit 6), so the
    first, once refused, removes only a folder nobody else uses."""
    import medgn.infer.run as run_module
    from medgn.errors import LockedError

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_nifti(inputs / "a.nii.gz", image_array())
    out = tmp_path / "new"
    real_find = run_module.find_inputs
    seen: list[str] = []

    def find_while_another_run_arrives(*args: Any, **kwargs: Any) -> Any:
        if not seen:
            seen.append("second run")
            with pytest.raises(LockedError):
                run_module.infer(tmp_path / "no-model", inputs, out)
            assert out.is_dir()  # the second run, refused, left the first one's folder alone
        return real_find(*args, **kwargs)

    monkeypatch.setattr(run_module, "find_inputs", find_while_another_run_arrives)
    with pytest.raises(UsageError, match="DICOM-SEG needs a DICOM series"):
        run_module.infer(tmp_path / "no-model", inputs, out, output_format="dicom-seg")
    assert seen and not out.exists()


def test_rerun_on_an_input_that_went_bad_keeps_the_earlier_outputs(
    tmp_path: Path, model_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    scan = write_nifti(inputs / "scan.nii.gz", image_array())
    out = tmp_path / "out"
    argv = ["infer", "--model", model_run, "--input", scan, "--output", out, "--no-progress"]
    assert cli(argv, capsys).code == 0
    earlier = {k: v for k, v in tree_hashes(out).items() if k != "report.json"}
    truncate(scan)
    result = cli(argv, capsys)  # another input now: its outputs are not replaced without --overwrite
    assert_clean_failure(result, 2, ["scan.nii.gz"], ["pass --overwrite"], outputs=[out])
    result = cli([*argv, "--overwrite"], capsys)  # the case fails before publishing: nothing changes
    assert_clean_failure(result, 3, [scan], ["truncated"], outputs=[out])
    assert {k: v for k, v in tree_hashes(out).items() if k != "report.json"} == earlier


def test_gdcm_notices_on_a_folder_without_series_stay_off_the_terminal(tmp_path: Path, model_run: Path) -> None:
    """GDCM prints "No Series were found" straight to file descriptor 2 while medgn scans a folder."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.dcm").write_bytes(b"DICM but not really")
    out = tmp_path / "out"
    result = run_medgn(["infer", "--model", model_run, "--input", empty, "--output", out, "--no-progress"])
    assert result.code in (2, 3), result.err
    assert len(result.err.strip().splitlines()) == 1 and result.err.startswith("medgn: error: "), result.err
    assert "GDCM" not in result.err and "WARNING" not in result.err


def test_other_libraries_log_warnings_stay_off_the_terminal() -> None:
    """highdicom and pydicom log through logging; with no handler, Python would print them on stderr."""
    pre = (
        "import logging, medgn.commands.env as e\n"
        "_run = e.run\n"
        "def run(args):\n"
        "    logging.getLogger('highdicom.seg').warning('a library notice')\n"
        "    return _run(args)\n"
        "e.run = run\n"
    )
    result = run_medgn(["env"], pre=pre)
    assert result.code == 0, result.err
    assert "a library notice" not in result.err + result.out


@pytest.mark.parametrize("threads", ["0", "-1", "100000"])
def test_thread_counts_out_of_range_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], threads: str
) -> None:
    scan = write_nifti(tmp_path / "a.nii.gz", image_array())
    argv = ["infer", "--model", tmp_path / "no-such-model", "--input", scan, "--output", tmp_path / "out"]
    result = cli([*argv, "--threads", threads, "--no-progress"], capsys)
    assert_clean_failure(result, 2, ["--threads"], ["value out of range", "1 <= threads <= 1024"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("space", "diagonal"),
    [("RAS", (1, 1, 1)), ("right-anterior-superior", (1, 1, 1)), ("LAS", (-1, 1, 1)), ("LPS", (-1, -1, 1))],
)
def test_nrrd_anatomical_spaces_are_read_in_their_orientation(
    tmp_path: Path, space: str, diagonal: tuple[int, int, int]
) -> None:
    """The anatomical spaces pass the check that refuses scanner-xyz and 3D-right-handed, each oriented."""
    path = raw_nrrd(
        tmp_path / "v.nrrd", (4, 4, 4), fields=f"space: {space}\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
    )
    np.testing.assert_allclose(read_header(path).affine[:3, :3], np.diag(diagonal), atol=1e-12)
