"""Detached data files (MetaImage ``ElementDataFile``, NRRD ``data file``) stay inside the header's folder.

Headers are written by hand (no library rewrites them) next to raw float32 voxels: one data file,
a ``LIST`` of per-slice files and a ``%03d`` pattern, each once inside the header's folder (read,
voxels equal to the array) and once leading out of it by ``..``, an absolute path or a symlink
(refused with code 3 naming the header and the field, by ``read_volume``, ``medgn infer`` and
``medgn verify``; the outside file is never opened).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from medgn.data.detached import detached_data_files
from medgn.data.io import read_volume
from medgn.errors import MedgnError
from tests.reliability.conftest import SHAPE, assert_clean_failure, cli, image_array, tree_hashes

META = (
    "ObjectType = Image\nNDims = 3\nDimSize = {x} {y} {z}\nElementSpacing = 1.5 1.25 2\nOffset = 0 0 "
    "0\nTransformMatrix = 1 0 0 0 1 0 0 0 1\nElementType = MET_FLOAT\nElementByteOrderMSB = "
    "False\nElementDataFile = {data}\n"
)
NRRD = (
    "NRRD0004\ntype: float\ndimension: 3\nsizes: {x} {y} {z}\nspace: left-posterior-superior\nspace "
    "directions: (1.5,0,0) (0,1.25,0) (0,0,2)\nspace origin: (0,0,0)\nencoding: raw\nendian: little\n{key}: "
    "{data}\n"
)


def _raw(array: np.ndarray) -> bytes:
    return np.asarray(array, "<f4").transpose(2, 1, 0).tobytes()  # x fastest, as both formats store


def _slices(folder: Path, array: np.ndarray, pattern: str) -> list[str]:
    names = []
    for k in range(array.shape[2]):
        name = pattern % k
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_raw(array[:, :, k : k + 1]))
        names.append(name)
    return names


def _header(folder: Path, name: str, data: str, *, key: str = "data file", extra: str = "") -> Path:
    x, y, z = SHAPE
    text = (
        NRRD.format(x=x, y=y, z=z, key=key, data=data)
        if name.endswith((".nhdr", ".nrrd"))
        else META.format(x=x, y=y, z=z, data=data)
    ) + extra
    (folder / name).write_text(text, encoding="ascii")
    return folder / name


def _case(tmp_path: Path, kind: str, fmt: str) -> Path:
    """A header ``scans/<kind><ext>`` whose data file(s) are placed as ``kind`` says."""
    scans, elsewhere = tmp_path / "scans", tmp_path / "elsewhere"
    scans.mkdir(exist_ok=True)
    elsewhere.mkdir(exist_ok=True)
    array = image_array()
    name = kind + (".nhdr" if fmt == "nrrd" else ".mhd")
    key = "datafile" if kind == "dotdot" and fmt == "nrrd" else "data file"  # the old spelling too
    if kind in ("inside", "dotdot", "absolute", "symlink"):
        target = {
            "inside": scans / "x.raw",
            "dotdot": elsewhere / "x.raw",
            "absolute": elsewhere / "abs.raw",
            "symlink": elsewhere / "linked.raw",
        }[kind]
        target.write_bytes(_raw(array))
        data = {"inside": "x.raw", "dotdot": "../elsewhere/x.raw", "absolute": str(target), "symlink": "link.raw"}[kind]
        if kind == "symlink":
            os.symlink(target, scans / "link.raw")
        return _header(scans, name, data, key=key)
    if kind in ("list_inside", "list_outside"):
        names = _slices(scans, array, "sl/s%02d.raw")
        if kind == "list_outside":
            names[3] = os.path.relpath(elsewhere / "s03.raw", scans)
            (elsewhere / "s03.raw").write_bytes(_raw(array[:, :, 3:4]))
        listing = "LIST 2" if fmt == "nrrd" else "LIST [2D]"
        return _header(scans, name, listing, extra="\n".join(names) + "\n")
    if kind in ("pattern_inside", "pattern_outside"):
        base = scans if kind == "pattern_inside" else elsewhere
        _slices(base, array, "p%03d.raw")
        prefix = "" if kind == "pattern_inside" else "../elsewhere/"
        subdim = " 2" if fmt == "nrrd" else ""  # MetaImage patterns take no slice dimension
        return _header(scans, name, f"{prefix}p%03d.raw 0 {SHAPE[2] - 1} 1{subdim}")
    raise AssertionError(kind)


INSIDE = ["inside", "list_inside", "pattern_inside"]
OUTSIDE = ["dotdot", "absolute", "symlink", "list_outside", "pattern_outside"]


@pytest.mark.parametrize("fmt", ["mha", "nrrd"])
@pytest.mark.parametrize("kind", INSIDE)
def test_data_files_inside_the_folder_are_read(tmp_path: Path, fmt: str, kind: str) -> None:
    header = _case(tmp_path, kind, fmt)
    assert all(tmp_path / "scans" in p.parents for p in detached_data_files(header))
    np.testing.assert_array_equal(read_volume(header).array, image_array())


@pytest.mark.parametrize("fmt", ["mha", "nrrd"])
@pytest.mark.parametrize("kind", OUTSIDE)
def test_data_files_outside_the_folder_are_refused(tmp_path: Path, fmt: str, kind: str) -> None:
    header = _case(tmp_path, kind, fmt)
    with pytest.raises(MedgnError) as info:
        read_volume(header)
    field = "ElementDataFile" if fmt == "mha" else ("datafile" if kind == "dotdot" else "data file")
    text = str(info.value)
    assert info.value.code == 3 and str(header) in text and "leaves the header's folder" in text and field in text, text


@pytest.mark.parametrize("data", ["p%s.raw 0 3 1", "p%d%d.raw 0 3 1", "p%03d.raw 0 9999999 1", "p%03d.raw 5 0 1"])
def test_invalid_patterns_are_refused(tmp_path: Path, data: str) -> None:
    header = _header(tmp_path, "bad.mhd", data)
    with pytest.raises(MedgnError) as info:
        detached_data_files(header)
    assert info.value.code == 3 and "ElementDataFile" in str(info.value)


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    header = _header(tmp_path, "gone.nhdr", "gone.raw")
    with pytest.raises(MedgnError, match="detached data file not found"):
        read_volume(header)


def test_infer_and_verify_refuse_a_header_pointing_outside(
    tmp_path: Path, model_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header = _case(tmp_path, "dotdot", "mha")
    before = {
        tmp_path / "scans": tree_hashes(tmp_path / "scans"),
        tmp_path / "elsewhere": tree_hashes(tmp_path / "elsewhere"),
    }
    out = tmp_path / "out"
    result = cli(["infer", "--model", model_run, "--input", header, "--output", out, "--no-progress"], capsys)
    assert_clean_failure(
        result,
        3,
        [header],
        ["leaves the header's folder", "../elsewhere/x.raw"],
        outputs=[out / "dotdot.mha", out / "dotdot.json", out],
        before=before,
    )
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "labels").mkdir()
    x, y, z = SHAPE
    (ds / "images" / "a.mhd").write_text(META.format(x=x, y=y, z=z, data="../../elsewhere/x.raw"))
    (ds / "labels" / "a.mhd").write_text(META.format(x=x, y=y, z=z, data="../../elsewhere/x.raw"))
    result = cli(["verify", ds], capsys)
    assert_clean_failure(result, 3, [ds], ["problem(s)"])
    assert "leaves the header's folder" in result.err and str(ds / "images" / "a.mhd") in result.err
    good = _case(tmp_path, "inside", "mha")
    assert (
        cli(
            ["infer", "--model", model_run, "--input", good, "--output", tmp_path / "out_good", "--no-progress"], capsys
        ).code
        == 0
    )
    assert (tmp_path / "out_good" / "inside.mha").is_file()


def test_a_changed_data_file_is_a_changed_input(
    tmp_path: Path, model_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The case's input hash covers the detached data: a rerun redoes the case, not skips it."""
    header = _case(tmp_path, "inside", "nrrd")
    argv = ["infer", "--model", model_run, "--input", header, "--output", tmp_path / "out", "--no-progress"]
    assert cli(argv, capsys).code == 0
    assert "1 skipped" in cli(argv, capsys).out
    (tmp_path / "scans" / "x.raw").write_bytes(_raw(image_array(seed=5)))
    result = cli(argv, capsys)  # another input now: its outputs are not replaced without --overwrite
    assert result.code == 2 and "pass --overwrite" in result.err
    assert cli([*argv, "--overwrite"], capsys).code == 0


def _outside_raw(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    (tmp_path / "elsewhere" / "x.raw").write_bytes(_raw(image_array()))


@pytest.mark.parametrize("key", ["DATA FILE", "Data File", "DataFile"])
def test_nrrd_field_names_in_any_case_are_checked(tmp_path: Path, key: str) -> None:
    """NRRD readers take field names in any case: "DATA FILE: ../x" must not slip past the check."""
    _outside_raw(tmp_path)
    (tmp_path / "scans").mkdir()
    header = _header(tmp_path / "scans", "a.nhdr", "../elsewhere/x.raw", key=key)
    with pytest.raises(MedgnError, match="leaves the header's folder") as info:
        read_volume(header)
    assert info.value.code == 3 and key in str(info.value)
    inside = _header(tmp_path / "scans", "b.nhdr", "x.raw", key=key)
    (tmp_path / "scans" / "x.raw").write_bytes(_raw(image_array()))
    np.testing.assert_array_equal(read_volume(inside).array, image_array())


def test_metaimage_field_with_a_colon_is_checked(tmp_path: Path) -> None:
    _outside_raw(tmp_path)
    (tmp_path / "scans").mkdir()
    header = _header(tmp_path / "scans", "a.mhd", "../elsewhere/x.raw")
    header.write_text(header.read_text().replace("ElementDataFile = ", "ElementDataFile : "))
    with pytest.raises(MedgnError, match="leaves the header's folder") as info:
        read_volume(header)
    assert info.value.code == 3


@pytest.mark.parametrize("name", ["a.nhdr", "a.mhd"])
def test_a_data_file_field_beyond_the_parsed_bytes_is_refused(tmp_path: Path, name: str) -> None:
    """Comments pushing the field past the parsed part of the header: refused, not read unchecked."""
    from medgn.data.detached import MAX_HEADER_BYTES

    _outside_raw(tmp_path)
    (tmp_path / "scans").mkdir()
    header = _header(tmp_path / "scans", name, "../elsewhere/x.raw")
    text = header.read_text()
    cut = text.index("data file" if name.endswith(".nhdr") else "ElementDataFile")
    filler = ("# " if name.endswith(".nhdr") else "Comment = ") + "x" * 998 + "\n"
    header.write_text(text[:cut] + filler * (MAX_HEADER_BYTES // 1000 + 10) + text[cut:])
    with pytest.raises(MedgnError, match="header too long") as info:
        read_volume(header)
    assert info.value.code == 3 and str(header) in str(info.value)
