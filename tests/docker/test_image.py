"""The CPU image against the virtual environment, on real scans, through ``docker run``.

``make docker-test`` (docker/ci_test.sh) builds the image offline from a wheelhouse holding the
virtual environment's exact wheels and runs this module with ``MEDGN_DOCKER_IMAGE`` set; without it
every test is skipped. Every container runs least-privileged: ``--network none --read-only --tmpfs
/tmp --user 10001:10001 --cap-drop ALL``, inputs and the model mounted read-only. Host paths are
mounted at the same paths inside the container, so both sides see identical file names.

Only medgn's command line is used (``python -m medgn`` in the venv, the image's entrypoint in the
container). Both sides run with ``--threads 1``: one thread makes PyTorch's CPU kernels
deterministic, so the masks must be byte-identical, not merely close.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
DATA = (REPO.parent / "shared" / "data").resolve()
IMAGE = os.environ.get("MEDGN_DOCKER_IMAGE", "")
UID = "10001"

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(not IMAGE, reason="MEDGN_DOCKER_IMAGE not set: run `make docker-test`"),
    pytest.mark.skipif(not (DATA / "LA2018").is_dir(), reason=f"no real scans in {DATA}"),
]

# A tiny network (two levels, four features) trained for two steps: enough to give non-trivial
# masks; the point is the same model in both places, not its quality.
TRAIN = [
    "--set",
    "model.features=[4,8]",
    "--set",
    "plan.patch_size=[32,32,32]",
    "--set",
    "plan.n_folds=2",
    "--set",
    "data.num_workers=0",
    "--set",
    "train.amp=off",
    "--set",
    "train.epochs=1",
    "--set",
    "train.iters_per_epoch=2",
    "--set",
    "train.val_every=1",
    "--set",
    "train.checkpoint_every_minutes=0",
    "--no-progress",
    "--device",
    "cpu",
]
INFER = ["--threads", "1", "--no-progress", "--device", "cpu"]


def _venv_medgn(args: Sequence[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUTF8": "1"}
    return subprocess.run(
        [sys.executable, "-m", "medgn", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _docker_args(mounts: dict[Path, str], user: str | None = f"{UID}:{UID}") -> list[str]:
    args = [
        "docker",
        "run",
        "--network",
        "none",
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    ]
    if user:
        args += ["--user", user]
    # The same numerics as the venv side: CPU bf16 follows the tests' setting (conftest), not the host.
    if "MEDGN_CPU_BF16" in os.environ:
        args += ["-e", f"MEDGN_CPU_BF16={os.environ['MEDGN_CPU_BF16']}"]
    for path, mode in mounts.items():
        args += ["-v", f"{path}:{path}:{mode}"]
    return args


def _container(
    args: Sequence[str],
    mounts: dict[Path, str] | None = None,
    *,
    entrypoint: str | None = None,
    user: str | None = f"{UID}:{UID}",
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    cmd = [*_docker_args(mounts or {}, user), "--rm"]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return subprocess.run([*cmd, IMAGE, *args], capture_output=True, text=True, timeout=timeout)


def _open_to_all(tree: Path) -> None:
    """Readable (folders also writable) for the container's user, which is not the host's."""
    for path in [tree, *tree.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o644)


def _payload(path: Path) -> bytes:
    """A mask file's bytes; for .gz the decompressed bytes (the gzip header holds a timestamp)."""
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection()


def _read_input(path: Path) -> sitk.Image:
    if path.is_dir():  # a DICOM series
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image")
    root.chmod(0o777)
    return root


@pytest.fixture(scope="module")
def model(work: Path) -> Path:
    """A run folder trained in the venv on a synthetic dataset at 2 mm (real scans get resampled)."""
    data = work / "cubes"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    training = []
    for i in range(3):
        rng = np.random.default_rng(i)
        label = np.zeros((32, 32, 32), np.uint8)
        label[6 + 2 * i : 20 + 2 * i, 8:22, 6 + 2 * i : 18 + 2 * i] = 1
        image = (label * 100 + 50 + rng.normal(0, 10, label.shape)).astype(np.float32)
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            nifti = nib.Nifti1Image(array, affine)
            nifti.header.set_qform(affine, code=1)
            nifti.header.set_sform(affine, code=1)
            nib.save(nifti, data / folder / f"cube{i}.nii.gz")
        training.append({"image": f"./imagesTr/cube{i}.nii.gz", "label": f"./labelsTr/cube{i}.nii.gz"})
    description = {
        "name": "cubes",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "cube"},
        "numTraining": 3,
        "training": training,
        "test": [],
    }
    (data / "dataset.json").write_text(json.dumps(description))
    run = work / "model"
    proc = _venv_medgn(["train", "--data", str(data), "--out", str(run), *TRAIN])
    assert proc.returncode == 0, proc.stderr[-2000:]
    _open_to_all(run)
    return run


@pytest.fixture(scope="module")
def la_cases() -> list[Path]:
    return sorted((DATA / "LA2018" / "imagesTr").glob("*.nii.gz"))


@pytest.fixture(scope="module")
def scans(work: Path, la_cases: list[Path]) -> dict[str, Path]:
    """Inputs: a folder with an LA2018 NIfTI and the NRRD sample, and the DICOM series folder."""
    folder = work / "scans"
    folder.mkdir()
    shutil.copy(la_cases[0], folder)
    shutil.copy(DATA / "samples" / "mr_brain_tumor.nrrd", folder)
    _open_to_all(folder)
    return {"folder": folder, "dicom": DATA / "samples" / "ct_dicom_series"}


@pytest.fixture(scope="module")
def masks(work: Path, model: Path, scans: dict[str, Path]) -> dict[str, tuple[Path, Path]]:
    """(venv output folder, container output folder) for each input."""
    result = {}
    for key, source in scans.items():
        venv_out, box_out = work / f"venv-{key}", work / f"box-{key}"
        proc = _venv_medgn(["infer", "--model", str(model), "--input", str(source), "--output", str(venv_out), *INFER])
        assert proc.returncode == 0, proc.stderr[-2000:]
        box_out.mkdir(mode=0o777)
        box_out.chmod(0o777)
        mounts = {model: "ro", source: "ro", box_out: "rw"}
        proc = _container(
            ["infer", "--model", str(model), "--input", str(source), "--output", str(box_out), *INFER], mounts
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        result[key] = (venv_out, box_out)
    return result


def test_image_user_is_10001_by_default() -> None:
    proc = _container(["-u"], entrypoint="id", user=None)
    assert proc.returncode == 0 and proc.stdout.strip() == UID, proc.stdout + proc.stderr


def test_no_arguments_prints_help() -> None:
    proc = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", IMAGE], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: medgn") and "infer" in proc.stdout


def test_verify_real_dataset_as_in_venv(work: Path, la_cases: list[Path]) -> None:
    source = json.loads((DATA / "LA2018" / "dataset.json").read_text())
    mini = work / "la-mini"
    for folder in ("imagesTr", "labelsTr"):
        (mini / folder).mkdir(parents=True)
    for image in la_cases[:3]:
        shutil.copy(image, mini / "imagesTr")
        shutil.copy(DATA / "LA2018" / "labelsTr" / image.name, mini / "labelsTr")
    names = {f"./imagesTr/{p.name}" for p in la_cases[:3]}
    source["training"] = [case for case in source["training"] if case["image"] in names]
    source["numTraining"], source["test"] = len(source["training"]), []
    assert len(source["training"]) == 3, "dataset.json lists images as ./imagesTr/<name>"
    (mini / "dataset.json").write_text(json.dumps(source))
    _open_to_all(mini)
    venv = _venv_medgn(["verify", str(mini)])
    box = _container(["verify", str(mini)], {mini: "ro"})
    assert venv.returncode == 0 and box.returncode == 0, box.stderr[-2000:]
    assert "all 3 cases passed" in box.stdout
    assert box.stdout == venv.stdout


@pytest.mark.parametrize("key", ["folder", "dicom"])
def test_masks_byte_identical_to_venv_with_input_geometry(
    key: str, masks: dict[str, tuple[Path, Path]], scans: dict[str, Path]
) -> None:
    venv_out, box_out = masks[key]
    names = sorted(p.name for p in venv_out.iterdir() if p.suffix in (".gz", ".nrrd"))
    assert names == sorted(p.name for p in box_out.iterdir() if p.suffix in (".gz", ".nrrd"))
    expected = {"folder": 2, "dicom": 1}[key]
    assert len(names) == expected, names
    for name in names:
        assert _payload(box_out / name) == _payload(venv_out / name), f"{name}: the container's mask differs"
        mask = sitk.ReadImage(str(box_out / name))
        stem = name.removesuffix(".nii.gz").removesuffix(".nrrd")
        source = scans["dicom"] if key == "dicom" else next(scans["folder"].glob(stem + ".*"))
        assert _geometry(mask) == _geometry(_read_input(source)), name
        values = np.unique(sitk.GetArrayViewFromImage(mask))
        assert set(values.tolist()) <= {0, 1}, values
    report = json.loads((box_out / "report.json").read_text())
    assert report["counts"] == {"ok": expected, "skipped": 0, "failed": 0}
    assert not list(box_out.glob(".medgn-tmp-*"))


def test_one_scan_named_mask_as_in_venv(
    work: Path, model: Path, masks: dict[str, tuple[Path, Path]], scans: dict[str, Path]
) -> None:
    """``--output /out/<name>.nii.gz`` for one scan: that mask and its record, nothing else in /out."""
    scan = next(scans["folder"].glob("la_*.nii.gz"))
    out = work / "box-named"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    target = out / "la_seg.nii.gz"
    mounts = {model: "ro", scans["folder"]: "ro", out: "rw"}
    proc = _container(["infer", "--model", str(model), "--input", str(scan), "--output", str(target), *INFER], mounts)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["la_seg.json", "la_seg.nii.gz"]
    assert _payload(target) == _payload(masks["folder"][0] / scan.name), "the named mask differs from the folder run's"


def test_evaluate_as_in_venv(work: Path, masks: dict[str, tuple[Path, Path]], la_cases: list[Path]) -> None:
    pred, ref = work / "eval-pred", work / "eval-ref"
    pred.mkdir()
    ref.mkdir()
    name = la_cases[0].name
    shutil.copy(masks["folder"][1] / name, pred)
    shutil.copy(DATA / "LA2018" / "labelsTr" / name, ref)
    _open_to_all(pred)
    _open_to_all(ref)
    venv_out, box_out = work / "eval-venv", work / "eval-box"
    box_out.mkdir(mode=0o777)
    box_out.chmod(0o777)
    venv = _venv_medgn(["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(venv_out)])
    box = _container(
        ["evaluate", "--pred", str(pred), "--ref", str(ref), "--out", str(box_out)],
        {pred: "ro", ref: "ro", box_out: "rw"},
    )
    assert venv.returncode == 0, venv.stderr[-2000:]
    assert box.returncode == 0, box.stderr[-2000:]
    assert (box_out / "metrics.csv").read_text() == (venv_out / "metrics.csv").read_text()
    assert json.loads((box_out / "summary.json").read_text()) == json.loads((venv_out / "summary.json").read_text())


# Run inside the container as the image's Python: every write outside the output mount and /tmp
# must fail, and there must be no network interface but loopback.
_PROBE = """
import json, socket, sys
out = sys.argv[1]
result = {}
for target in ["/opt/medgn/x", "/x", "/etc/x", sys.argv[2] + "/x", out + "/ok", "/tmp/ok"]:
    try:
        open(target, "w").close()
        result[target] = "written"
    except OSError as exc:
        result[target] = type(exc).__name__
result["interfaces"] = sorted(name for _, name in socket.if_nameindex())
try:
    socket.create_connection(("10.0.0.1", 53), timeout=3)
    result["connect"] = "connected"
except OSError as exc:
    result["connect"] = type(exc).__name__
print(json.dumps(result))
"""


def test_writes_only_to_output_and_tmp_and_no_network(work: Path, scans: dict[str, Path]) -> None:
    out = work / "probe-out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    folder = scans["folder"]
    proc = _container(
        ["-c", _PROBE, str(out), str(folder)], {folder: "ro", out: "rw"}, entrypoint="/opt/medgn/venv/bin/python"
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result[f"{out}/ok"] == "written" and result["/tmp/ok"] == "written"
    for target in ("/opt/medgn/x", "/x", "/etc/x", f"{folder}/x"):
        assert result[target] in ("OSError", "PermissionError"), (target, result[target])
    assert result["interfaces"] == ["lo"]
    assert result["connect"] != "connected"
    # medgn itself refuses an output folder on the read-only image with its one-line error.
    proc = _container(
        ["infer", "--model", "/nonexistent", "--input", str(folder), "--output", "/opt/medgn/out", *INFER],
        {folder: "ro"},
    )
    assert proc.returncode != 0
    assert proc.stderr.startswith("medgn: error:"), proc.stderr


def test_bad_scan_exits_3_with_one_line_error(work: Path, model: Path) -> None:
    bad, out = work / "bad", work / "bad-out"
    bad.mkdir()
    (bad / "broken.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(2048))
    _open_to_all(bad)
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    args = [
        "infer",
        "--model",
        str(model),
        "--input",
        str(bad / "broken.nii.gz"),
        "--output",
        str(out / "masks"),
        *INFER,
    ]
    proc = _container(args, {model: "ro", bad: "ro", out: "rw"})
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medgn: error:") and "broken.nii.gz" in lines[0], proc.stderr
    assert not list(out.rglob("*.nii.gz")) and not list(out.rglob(".medgn-tmp-*"))


def test_docker_stop_keeps_finished_masks_and_no_partial_file(work: Path, model: Path, la_cases: list[Path]) -> None:
    scans, out = work / "stop-in", work / "stop-out"
    scans.mkdir()
    for case in la_cases[:12]:  # ~1 s each on one core: the stop lands mid-folder
        shutil.copy(case, scans)
    _open_to_all(scans)
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    name = f"medgn-stop-{os.getpid()}"
    cmd = [
        *_docker_args({model: "ro", scans: "ro", out: "rw"}),
        "-d",
        "--name",
        name,
        IMAGE,
        "infer",
        "--model",
        str(model),
        "--input",
        str(scans),
        "--output",
        str(out),
        *INFER,
    ]
    started = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("la_*.nii.gz")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(out.glob("la_*.nii.gz")), "no mask within 300 s"
        t0 = time.monotonic()
        stop = subprocess.run(["docker", "stop", "-t", "60", name], capture_output=True, text=True, timeout=120)
        stop_seconds = time.monotonic() - t0
        assert stop.returncode == 0, stop.stderr
        state = json.loads(
            subprocess.run(
                ["docker", "inspect", "-f", "{{json .State}}", name], capture_output=True, text=True, check=True
            ).stdout
        )
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)
    # 143: medgn received SIGTERM and stopped itself well before docker's 60 s SIGKILL (137).
    assert state["ExitCode"] == 143, (state, logs[-2000:])
    assert stop_seconds < 30, stop_seconds
    done = sorted(out.glob("la_*.nii.gz"))
    assert 1 <= len(done) < 12, [p.name for p in done]
    assert not list(out.glob(".medgn-tmp-*")), sorted(p.name for p in out.iterdir())
    for mask in done:  # every mask present is complete and has the input's geometry
        image = sitk.ReadImage(str(mask))
        assert _geometry(image) == _geometry(sitk.ReadImage(str(scans / mask.name)))
