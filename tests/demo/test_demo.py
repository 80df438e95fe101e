"""The demo: the MNI152-derived dataset is valid and reproducible, and the whole demo runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medgn.data.datasets import load_dataset
from medgn.data.verify import verify_dataset
from medgn.demo.make_dataset import build_demo_dataset


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 6 mm voxels: a quarter of a second per subject.
    return build_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", n_train=3, n_test=1, spacing_mm=6.0, seed=3)


def test_dataset_is_a_valid_msd_dataset(demo_data: Path) -> None:
    index = load_dataset(demo_data)
    assert index.format == "msd" and len(index.cases) == 3 and len(index.test_cases) == 1
    assert index.labels == {"background": 0, "grey_matter": 1, "white_matter": 2}
    report = verify_dataset(index)
    assert report.ok, report.problems


def test_subjects_differ_and_labels_are_tissues(demo_data: Path) -> None:
    a = np.asanyarray(nib.load(demo_data / "imagesTr" / "mni_000.nii.gz").dataobj)
    b = np.asanyarray(nib.load(demo_data / "imagesTr" / "mni_001.nii.gz").dataobj)
    assert a.shape == b.shape and not np.allclose(a, b)
    label = np.asanyarray(nib.load(demo_data / "labelsTr" / "mni_000.nii.gz").dataobj)
    counts = np.bincount(label.ravel(), minlength=3)
    assert set(np.unique(label)) == {0, 1, 2}
    assert counts[1] > 0.05 * label.size and counts[2] > 0.05 * label.size  # brain tissue, not noise
    # White matter is brighter than grey matter on T1.
    assert a[label == 2].mean() > a[label == 1].mean()


def test_same_seed_same_subjects(tmp_path: Path, demo_data: Path) -> None:
    again = build_demo_dataset(tmp_path / "again", n_train=3, n_test=1, spacing_mm=6.0, seed=3)
    for name in ("imagesTr/mni_002.nii.gz", "labelsTs/mni_003.nii.gz"):
        assert np.array_equal(
            np.asanyarray(nib.load(demo_data / name).dataobj), np.asanyarray(nib.load(again / name).dataobj)
        )


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo_run"
    cmd = [
        sys.executable,
        "-m",
        "medgn.demo",
        "--out",
        str(out),
        "--train-subjects",
        "3",
        "--test-subjects",
        "1",
        "--time-budget",
        "1m",
        "--set",
        "train.epochs=2",
        "--set",
        "train.iters_per_epoch=3",
        "--set",
        "train.val_every=1",
        "--set",
        "train.warmup_iters=0",
        "--set",
        "model.features=[8,16]",
        "--set",
        "plan.patch_size=[32,32,32]",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "grey matter    Dice" in proc.stdout and "white matter   Dice" in proc.stdout
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert summary["counts"]["evaluated"] == 1
    assert (out / "run" / "progress.png").is_file() and (out / "evaluation" / "boxplot.png").is_file()
    assert len(list((out / "predictions").glob("*.nii.gz"))) == 1
    # The next demo replaces this one's folder (it held splits.json, which was taken for a foreign file).
    from medgn.demo.__main__ import _replace_demo_folder

    _replace_demo_folder(out)
    assert out.is_dir() and [p.name for p in out.iterdir()] == [".medgn-demo"]


def test_demo_never_replaces_a_folder_that_is_not_a_demo_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medgn.demo.__main__ import main

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    assert main(["--out", str(victim)]) == 2
    assert "not a demo output" in capsys.readouterr().err and (victim / "precious.txt").read_text() == "keep"
    (tmp_path / "file").write_text("keep")
    assert main(["--out", str(tmp_path / "file")]) == 2
    assert (tmp_path / "file").read_text() == "keep"
    earlier = tmp_path / "earlier"
    (earlier / "run").mkdir(parents=True)
    assert main(["--out", str(earlier), "--train-subjects", "1"]) == 2  # checked before replacing
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("medgn: error: ") and "too few subjects" in err[-1]
    assert (earlier / "run").is_dir()


def test_a_folder_with_demo_like_names_but_no_demo_is_never_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A project folder holding its own dataset/ and splits.json was deleted: names alone passed.
    from medgn.demo.__main__ import main

    project = tmp_path / "project"
    (project / "dataset").mkdir(parents=True)
    (project / "dataset" / "my_scan.nii.gz").write_text("precious")
    (project / "splits.json").write_text("{}")
    assert main(["--out", str(project), "--train-subjects", "2", "--test-subjects", "1"]) == 2
    assert "not a demo output (got no demo marker" in capsys.readouterr().err
    assert (project / "dataset" / "my_scan.nii.gz").read_text() == "precious"


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--time-budget", "bogus"], "--time-budget: invalid duration"),
        (["--config", "nope.yaml"], "config file not found"),
        (["--set", "train.bogus=1"], "train.bogus"),
    ],
)
def test_demo_options_are_refused_before_an_earlier_demo_is_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str], words: str
) -> None:
    from medgn.demo.__main__ import MARKER, main

    earlier = tmp_path / "earlier"
    (earlier / "run").mkdir(parents=True)
    (earlier / MARKER).write_text("")
    (earlier / "run" / "kept").write_text("x")
    assert main(["--out", str(earlier), *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medgn: error: ") and words in err[0], err
    assert (earlier / "run" / "kept").is_file() and not (earlier / "dataset").exists()


def test_demo_output_paths_it_cannot_use_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from medgn.demo.__main__ import MARKER, main

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / MARKER).write_text("")
    (tmp_path / "link").symlink_to(earlier)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out, words in (
        (str(tmp_path / "link"), "is a symbolic link"),
        (".", "holds the current folder"),
        (str(tmp_path), "holds the current folder"),
        ("/dev/null/x", "cannot make the demo folder"),
    ):
        assert main(["--out", out, "--train-subjects", "2", "--test-subjects", "1"]) == 2, out
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (out, err)
    assert (earlier / MARKER).is_file() and here.is_dir()


def test_ctrl_c_while_the_dataset_is_built_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import medgn.demo.__main__ as demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "build_demo_dataset", interrupted)
    assert demo.main(["--out", str(tmp_path / "d"), "--train-subjects", "2", "--test-subjects", "1"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["medgn: stopped: interrupted; the next demo replaces the folder"], err
    assert (tmp_path / "d" / demo.MARKER).is_file()  # so the next demo may replace it


def test_the_demo_config_ships_inside_the_package() -> None:
    # It lived in the source tree's configs/, so a wheel's demo failed after minutes of building.
    import medgn.demo
    from medgn.config import load_run_config
    from medgn.demo.__main__ import DEMO_CONFIG

    assert DEMO_CONFIG.parent == Path(medgn.demo.__file__).parent
    assert tuple(load_run_config(DEMO_CONFIG).plan.patch_size) == (48, 48, 48)
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"medgn.demo" = ["demo.yaml"]' in pyproject


def test_the_training_plot_is_named_only_when_it_was_drawn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A budget that ends inside the first epoch draws no plot; the demo still named progress.png.
    import medgn.demo.__main__ as demo

    out = tmp_path / "d"

    def fake_step(argv: list[str]) -> int:
        if argv[0] == "evaluate":
            (out / "evaluation").mkdir(parents=True)
            summary = {"per_class": {"1": {"dice": {"mean": 0.5, "n": 1}}}}
            (out / "evaluation" / "summary.json").write_text(json.dumps(summary))
        if argv[0] == "train" and drawn:
            (out / "run").mkdir(parents=True)
            (out / "run" / "progress.png").write_bytes(b"png")
        return 0

    monkeypatch.setattr(demo, "medgn_main", fake_step)
    monkeypatch.setattr(demo, "build_demo_dataset", lambda folder, **kwargs: folder.mkdir(parents=True))
    for drawn in (False, True):
        assert demo.main(["--out", str(out), "--train-subjects", "2", "--test-subjects", "1"]) == 0
        named = "training plot:" in capsys.readouterr().out
        assert named == drawn
