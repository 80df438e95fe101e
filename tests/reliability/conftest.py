"""Fixture generators for the reliability suite: tiny valid volumes and every way to break them.

Everything is generated at test time from a tiny valid volume (no binary files in the repository):
NIfTI/NRRD/MHA writers, raw NIfTI header patching (after saving, because nibabel "repairs"
headers on load), truncation, DICOM series built with SimpleITK (one series, two series, a missing
slice), a tiny MSD dataset, a run folder with a real untrained checkpoint, sha256 snapshots of a
folder tree, and runners for ``medgn`` in-process (capturing stderr) and in a subprocess (optionally
through a ``python -c`` wrapper that monkeypatches medgn first). :func:`assert_clean_failure`
checks the whole contract of a refused input: exit category, exactly one ``medgn: error:`` line
naming the file and the problem, no traceback, no output, no temporary file, inputs unchanged.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medgn.files import TEMP_MARK

REPO = Path(__file__).resolve().parents[2]

# (X, Y, Z) of the tiny volume: distinct sizes so a transposed read changes the shape.
SHAPE = (10, 9, 8)
# Anisotropic spacing, so a swapped axis changes the geometry too.
SPACING = (1.5, 1.25, 2.0)
AFFINE = np.array([[1.5, 0, 0, -7.0], [0, 1.25, 0, 3.5], [0, 0, 2.0, 11.0], [0, 0, 0, 1.0]])

# Byte offset and struct format of NIfTI-1 header fields (nifti1.h), little endian.
NIFTI1_FIELDS: dict[str, tuple[int, str]] = {
    "dim": (40, "<8h"),
    "datatype": (70, "<h"),
    "bitpix": (72, "<h"),
    "pixdim": (76, "<8f"),
    "vox_offset": (108, "<f"),
    "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"),
    "qform_code": (252, "<h"),
    "sform_code": (254, "<h"),
    "quatern_b": (256, "<f"),
    "quatern_c": (260, "<f"),
    "quatern_d": (264, "<f"),
    "qoffset_x": (268, "<f"),
    "qoffset_y": (272, "<f"),
    "qoffset_z": (276, "<f"),
    "srow_x": (280, "<4f"),
    "srow_y": (296, "<4f"),
    "srow_z": (312, "<4f"),
    "magic": (344, "<4s"),
}


def image_array(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """A float32 volume: noise around 50 with a bright off-centre block (asymmetric on purpose)."""
    rng = np.random.default_rng(seed)
    array = (50.0 + rng.normal(0.0, 5.0, size=shape)).astype(np.float32)
    array[1:5, 2:6, 1:4] += 100.0
    return array


def label_array(shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    """A uint8 label: 1 on the bright block of :func:`image_array`."""
    label = np.zeros(shape, np.uint8)
    label[1:5, 2:6, 1:4] = 1
    return label


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE, codes: tuple[int, int] = (1, 1)) -> Path:
    """Save ``array`` as NIfTI-1 with ``affine`` and (qform, sform) codes; returns ``path``."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=codes[0])
    img.header.set_sform(affine, code=codes[1])
    nib.save(img, str(path))
    return path


def write_itk(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """Save ``array`` (X, Y, Z) as NRRD/MHA (by suffix) with the RAS ``affine`` converted to LPS."""
    from medgn.data.preflight import itk_geometry

    origin, spacing, direction = itk_geometry(affine)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), True)
    return path


def write_image(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    """NIfTI for ``.nii``/``.nii.gz`` names, otherwise SimpleITK (NRRD, MHA)."""
    if path.name.endswith((".nii", ".nii.gz")):
        return write_nifti(path, array, affine)
    return write_itk(path, array, affine)


def _raw(path: Path) -> tuple[bytearray, bool]:
    gz = path.name.endswith(".gz")
    data = path.read_bytes()
    return bytearray(gzip.decompress(data) if gz else data), gz


def patch_nifti(path: Path, field: str, values: float | Sequence[float]) -> Path:
    """Overwrite one raw NIfTI-1 header field in place (gzip or not), bypassing nibabel."""
    data, gz = _raw(path)
    offset, fmt = NIFTI1_FIELDS[field]
    packed = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    struct.pack_into(fmt, data, offset, *packed)
    path.write_bytes(gzip.compress(bytes(data), mtime=0) if gz else bytes(data))
    return path


def patch_nifti_fields(path: Path, fields: dict[str, float | Sequence[float]]) -> Path:
    """Patch several raw header fields at once (one decompress/compress)."""
    data, gz = _raw(path)
    for field, values in fields.items():
        offset, fmt = NIFTI1_FIELDS[field]
        packed = tuple(values) if isinstance(values, (tuple, list)) else (values,)
        struct.pack_into(fmt, data, offset, *packed)
    path.write_bytes(gzip.compress(bytes(data), mtime=0) if gz else bytes(data))
    return path


def raw_nrrd(
    path: Path,
    sizes: Sequence[int],
    fields: str = "space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n",
    data: bytes = bytes(256),
) -> Path:
    """A hand-written float NRRD: the header fields are exactly what is given (no library repairs them)."""
    header = (
        f"NRRD0004\ntype: float\ndimension: {len(sizes)}\nsizes: "
        f"{' '.join(map(str, sizes))}\n{fields}encoding: raw\nendian: little\n\n"
    )
    path.write_bytes(header.encode("ascii") + data)
    return path


def raw_mha(path: Path, sizes: Sequence[int], data: bytes = bytes(256)) -> Path:
    """A hand-written float MetaImage with the given DimSize."""
    header = (
        f"ObjectType = Image\nNDims = {len(sizes)}\nDimSize = {' '.join(map(str, sizes))}\nElementType = "
        "MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode("ascii") + data)
    return path


def truncate(path: Path, keep: float = 0.6) -> Path:
    """Cut the file to ``keep`` of its bytes (a download or copy that stopped early)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def dicom_series(
    folder: Path,
    array: np.ndarray,
    *,
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
    skip: Iterable[int] = (),
    spacing: float = 2.0,
) -> Path:
    """Write ``array`` (X, Y, Z) as a DICOM series, one file per z slice, leaving out ``skip``."""
    folder.mkdir(parents=True, exist_ok=True)
    skipped = set(skip)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[2]):
        if k in skipped:
            continue
        slice_ = sitk.GetImageFromArray(np.ascontiguousarray(array[:, :, k].T.astype(np.int16))[None])
        slice_.SetSpacing((1.0, 1.0, spacing))
        tags = {
            "0008|0060": "CT",
            "0010|0020": "P1",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": series_uid,
            "0020|0032": f"0\\0\\{k * spacing}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k + 1),
            "0028|0030": "1\\1",
            "0018|0050": str(spacing),
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-6:]}_{k:03d}.dcm"))
        writer.Execute(slice_)
    return folder


def make_msd(root: Path, n: int = 2, shape: tuple[int, ...] = SHAPE) -> Path:
    """A valid MSD dataset of ``n`` cases (``imagesTr/c{i}.nii.gz`` + labels, ``dataset.json``)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(n):
        write_nifti(root / "imagesTr" / f"c{i}.nii.gz", image_array(i, shape))
        write_nifti(root / "labelsTr" / f"c{i}.nii.gz", label_array(shape))
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    desc = {
        "name": "tiny",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "block"},
        "numTraining": n,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    return root


def tiny_plan(in_channels: int = 1, num_classes: int = 2) -> dict:
    """A plan that keeps the input grid (target spacing = the fixtures' RAS spacing)."""
    return {
        "version": 1,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "label_values": list(range(num_classes)),
        "target_spacing": list(SPACING),
        "normalization": [{"scheme": "zscore"}] * in_channels,
        "patch_size": [8, 8, 8],
        "batch_size": 1,
        "network": {"strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3], [3, 3, 3]]},
    }


def model_state(in_channels: int = 1, num_classes: int = 2, seed: int = 0) -> dict:
    """A checkpoint state of a real (untrained) two-stage UNet3D with its config and plan."""
    import torch

    from medgn.configtools import build
    from medgn.models.config import UNet3DConfig
    from medgn.models.registry import build_model

    plan = tiny_plan(in_channels, num_classes)
    config = {"model": {"features": [4, 8], "num_groups": 2, "deep_supervision": False}}
    torch.manual_seed(seed)
    net = build_model(
        build(UNet3DConfig, config["model"], "model"),
        in_channels,
        num_classes,
        plan["network"]["strides"],
        plan["network"]["kernel_sizes"],
    )
    return {
        "model": {k: v.clone() for k, v in net.state_dict().items()},
        "config": config,
        "plan": plan,
        "counters": {"epoch": 1, "iteration": 1},
    }


def save_run(run_dir: Path, **kwargs: int) -> Path:
    """A run folder with one checkpoint marked latest and best; returns ``run_dir``."""
    from medgn.checkpoint import save_checkpoint

    save_checkpoint(model_state(**kwargs), run_dir / "checkpoints", tag="epoch", pointers=("latest", "best"))
    return run_dir


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (or of ``root`` itself), by relative path."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {
        str(p.relative_to(root.parent if root.is_file() else root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in files
    }


def temp_files(root: Path) -> list[Path]:
    """Temporary files of the atomic writer left anywhere under ``root``."""
    return sorted(p for p in Path(root).rglob(f"{TEMP_MARK}*"))


@dataclass
class Result:
    """Exit code and captured streams of one medgn run."""

    code: int
    out: str
    err: str


def cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> Result:
    """Run ``medgn`` in this process; stderr/stdout captured by pytest's ``capsys``."""
    from medgn.cli import main
    from medgn.logs import detach_file_logs

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    finally:
        detach_file_logs()  # each run attaches its own log file
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


# Runs medgn.cli.main after executing PRE (monkeypatches) given in the environment.
WRAPPER = """
import os, sys
exec(os.environ.get("MEDGN_TEST_PRE", ""))
from medgn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def medgn_cmd(argv: Sequence[str]) -> list[str]:
    """The command line running ``medgn`` through the wrapper (``python -c``)."""
    return [sys.executable, "-c", WRAPPER, *[str(a) for a in argv]]


def child_env(pre: str = "", **extra: str) -> dict[str, str]:
    """Environment of a medgn subprocess: one thread, the repo importable, optional patches."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDGN_TEST_PRE": pre, "PYTHONPATH": str(REPO)}
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    env.update(extra)
    return env


def run_medgn(argv: Sequence[str], *, pre: str = "", timeout: float = 240, **env: str) -> Result:
    """Run ``medgn`` in a subprocess (``pre``: Python run first, e.g. a monkeypatch)."""
    proc = subprocess.run(
        medgn_cmd(argv), env=child_env(pre, **env), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_clean_failure(
    result: Result,
    code: int,
    names: Iterable[str | os.PathLike[str]],
    words: Iterable[str],
    *,
    outputs: Iterable[Path] = (),
    before: dict[Path, dict[str, str]] | None = None,
    error_lines: int = 1,
) -> str:
    """Assert the contract of a refused input and return the ``medgn: error:`` line(s).

    Args:
        result: the run.
        code: expected exit-code category.
        names: file names (or paths) the error line(s) must mention.
        words: words describing the problem that must appear (case-insensitive).
        outputs: final output paths that must not exist (folders: must hold no temp files).
        before: ``{root: tree_hashes(root)}`` taken before the run; must be unchanged.
        error_lines: how many ``medgn: error:`` lines (one per failed case in batch inference).
    """
    assert result.code == code, f"exit {result.code}, expected {code}\nstderr: {result.err[-3000:]}"
    assert "Traceback" not in result.err, result.err[-3000:]
    lines = [line for line in result.err.splitlines() if line.startswith("medgn: error: ")]
    assert len(lines) == error_lines, result.err
    text = "\n".join(lines)
    for name in names:
        assert os.fspath(name) in text, f"{name} not named in: {text}"
    for word in words:
        assert word.lower() in text.lower(), f"{word!r} not in: {text}"
    for path in outputs:
        path = Path(path)
        if path.is_dir():
            assert not temp_files(path), temp_files(path)
        else:
            assert not path.exists(), f"{path} was written"
            if path.parent.is_dir():
                assert not temp_files(path.parent), temp_files(path.parent)
    for root, hashes in (before or {}).items():
        assert tree_hashes(root) == hashes, f"{root} changed"
        assert not temp_files(root) if Path(root).is_dir() else True
    return text


@contextlib.contextmanager
def unchanged(*roots: Path) -> Iterable[None]:
    """Assert on exit that every file under ``roots`` has the same sha256 as on entry."""
    before = {r: tree_hashes(r) for r in roots}
    yield
    for root, hashes in before.items():
        assert tree_hashes(root) == hashes, f"{root} changed"


def nifti_bytes(array: np.ndarray, affine: np.ndarray = AFFINE) -> bytes:
    """An uncompressed NIfTI-1 file's bytes for ``array`` (codes 1/1)."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img.to_bytes() if hasattr(img, "to_bytes") else _via_file(img)


def _via_file(img: nib.Nifti1Image) -> bytes:
    buffer = io.BytesIO()
    file_map = img.make_file_map({"image": buffer, "header": buffer})
    img.to_file_map(file_map)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def model_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with a real (untrained) 1-channel, 2-class UNet3D checkpoint."""
    return save_run(tmp_path_factory.mktemp("model") / "run")
