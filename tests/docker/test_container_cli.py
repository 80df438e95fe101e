"""The container's command line, run in the virtual environment as the image would run it.

Without a Docker engine the image cannot be built here, so this runs what the container runs: the
``medgn`` entrypoint with the Dockerfile's environment (HOME and every cache under a temporary
folder standing in for the container's /tmp), a read-only input folder and read-only weights, and
checks that inference and evaluation work and write only into the output mount.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_dockerfiles import DOCKERFILES, _instructions

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "workflows"))
from test_run_training import TINY, make_dataset  # noqa: E402


def _container_env(dockerfile: Path, tmp: Path) -> dict[str, str]:
    """The Dockerfile's ENV values with the container's /tmp mapped to ``tmp``."""
    env_text = " ".join(arg for word, arg in _instructions(dockerfile) if word == "ENV")
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    for key, value in re.findall(r"(\w+)=(\S+)", env_text):
        if key == "PATH":  # the image's own folders; the venv's medgn is called by path here
            continue
        env[key] = str(tmp) + value[len("/tmp") :] if value.startswith("/tmp") else value
    return env


def _read_only(tree: Path) -> None:
    for path in [tree, *tree.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _hashes(tree: Path) -> dict[str, str]:
    return {
        str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(tree.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from medgn.cli import main

    data = make_dataset(tmp_path_factory.mktemp("container") / "data", n=3, size=16)
    run = data.parent / "model"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(run),
                *TINY,
                "--set",
                "train.epochs=1",
                "--set",
                "train.iters_per_epoch=2",
            ]
        )
        == 0
    )
    return run, data


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_infer_and_evaluate_with_container_environment(
    dockerfile: Path, model_and_data: tuple[Path, Path], tmp_path: Path
) -> None:
    run, data = model_and_data
    container_tmp = tmp_path / "container-tmp"  # the container's --tmpfs /tmp
    container_tmp.mkdir()
    env = _container_env(dockerfile, container_tmp)
    assert env["HOME"].startswith(str(container_tmp)) and env["MPLCONFIGDIR"].startswith(str(container_tmp))
    inputs, weights, out = tmp_path / "in", tmp_path / "model", tmp_path / "out"
    inputs.mkdir()
    for image in (data / "imagesTr").glob("*.nii.gz"):
        (inputs / image.name).write_bytes(image.read_bytes())
    import shutil

    shutil.copytree(run, weights)
    _read_only(inputs)
    _read_only(weights)
    before = {**_hashes(inputs), **{f"model/{k}": v for k, v in _hashes(weights).items()}}
    out.mkdir()
    medgn = [str(Path(sys.executable).parent / "medgn")]  # ENTRYPOINT ["medgn"]
    infer = subprocess.run(
        medgn
        + [
            "infer",
            "--model",
            str(weights),
            "--input",
            str(inputs),
            "--output",
            str(out / "masks"),
            "--device",
            "cpu",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=container_tmp,
    )
    assert infer.returncode == 0, infer.stderr[-2000:]
    assert sorted(p.name for p in (out / "masks").glob("*.nii.gz")) == sorted(p.name for p in inputs.glob("*.nii.gz"))
    evaluate = subprocess.run(
        medgn + ["evaluate", "--pred", str(out / "masks"), "--ref", str(data / "labelsTr"), "--out", str(out / "eval")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=container_tmp,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    assert (out / "eval" / "summary.json").is_file()
    after = {**_hashes(inputs), **{f"model/{k}": v for k, v in _hashes(weights).items()}}
    assert after == before  # the read-only mounts were not touched
    # Nothing but the output mount and the container's /tmp was written.
    assert not any(p.name.startswith(".medgn-tmp-") for p in out.rglob("*"))
