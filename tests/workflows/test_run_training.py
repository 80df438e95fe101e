"""``medgn train`` end to end: verify, plan, split, train, outputs, exact resume, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medgn.checkpoint import load_checkpoint, read_pointer
from medgn.cli import main
from tests.tiny_config import tiny_sets

TINY = [
    *tiny_sets(
        {
            "train.optimizer": "adamw",
            "train.lr": "0.01",
            "train.val_every": "1",
            "train.log_every": "1",
            "train.checkpoint_every_minutes": "0",
        }
    ),
    "--no-progress",
    "--device",
    "cpu",
]


def make_dataset(root: Path, n: int = 4, size: int = 20) -> Path:
    """An MSD dataset of ``n`` cases: a bright noisy cube (label 1) in a dark noisy volume."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    training = []
    for i in range(n):
        rng = np.random.default_rng(i)
        label = np.zeros((size, size, size), np.uint8)
        a = 3 + i % 4
        label[a : a + 9, 4:13, a : a + 8] = 1
        image = (label * 100 + 50 + rng.normal(0, 10, label.shape)).astype(np.float32)
        for folder, arr in (("imagesTr", image), ("labelsTr", label)):
            img = nib.Nifti1Image(arr, affine)
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            nib.save(img, root / folder / f"c{i}.nii.gz")
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "tiny",
                "modality": {"0": "MRI"},
                "labels": {"0": "background", "1": "cube"},
                "numTraining": n,
                "training": training,
                "test": [],
            }
        )
    )
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    code = main(
        [
            "train",
            "--data",
            str(dataset),
            "--out",
            str(out),
            *TINY,
            "--set",
            "train.epochs=3",
            "--set",
            "train.iters_per_epoch=6",
        ]
    )
    assert code == 0
    return out


def test_run_folder_has_every_output(trained: Path) -> None:
    for name in (
        "config.yaml",
        "plan.json",
        "dataset_plan.json",
        "splits.json",
        "metrics.jsonl",
        "progress.png",
        "medgn.log",
        "train_summary.json",
        "postprocessing.json",
        "run.json",
    ):
        assert (trained / name).is_file(), name
    # Post-processing decided from the fold's held-out cases, with the Dice both ways recorded.
    decision = json.loads((trained / "postprocessing.json").read_text())
    assert decision["source"] == "cross-validation" and set(decision["lcc"]) == {"1"}
    assert decision["evidence"]["1"]["cases"] == 2
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
    assert not (trained / ".medgn.lock").exists()
    for pointer in ("latest", "best", "final"):
        assert read_pointer(trained / "checkpoints", pointer) is not None
    for path in (trained / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)  # data only: loads without pickle code
        assert state["plan"]["patch_size"] == [16, 16, 16]
        assert state["config"]["model"]["features"] == [4, 8]


def test_loss_goes_down_and_validation_is_recorded(trained: Path) -> None:
    epochs = [
        json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in line
    ]
    assert len(epochs) == 3
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert all(len(e["val_dice"]) == 1 for e in epochs)


def test_resolved_config_records_overrides(trained: Path) -> None:
    text = (trained / "config.yaml").read_text()
    assert "optimizer: adamw" in text and "patch_size: [16, 16, 16]" in text
    planned = json.loads((trained / "dataset_plan.json").read_text())["patch_size"]
    assert planned != [16, 16, 16]  # so the --set plan.patch_size override changed it, and the log says so
    assert (
        "the run config (its plan section, model.features) changes the dataset's plan: "
        f"patch_size {planned} -> [16, 16, 16]" in (trained / "medgn.log").read_text()
    )


def test_existing_run_needs_resume_and_missing_run_cannot_resume(
    trained: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--data", str(dataset), "--out", str(trained), *TINY]) == 2
    assert "already has checkpoints" in capsys.readouterr().err
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "new"), "--resume", *TINY]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_without_out_the_run_folder_is_named_after_dataset_config_and_fold(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --out: runs/<dataset>-<config>-fold<N> in the current folder; --resume finds it again."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "my-recipe.YAML"
    config.write_text("train:\n  epochs: 1\n  iters_per_epoch: 2\n")
    argv = ["train", "--data", str(dataset), "--config", str(config), "--fold", "1", *TINY]
    assert main(argv) == 0
    run = tmp_path / "runs" / "tiny-my-recipe-fold1"
    assert _state(run)["counters"]["iteration"] == 2
    assert json.loads((run / "run.json").read_text())["fold"] == 1
    assert capsys.readouterr().out.strip().endswith(f"run folder {Path('runs') / 'tiny-my-recipe-fold1'}")
    assert main(argv) == 2  # the same command again: that run exists
    assert "already has checkpoints" in capsys.readouterr().err
    assert main([*argv, "--resume", "--set", "train.epochs=2"]) == 0
    assert _state(run)["counters"]["iteration"] == 4
    monkeypatch.chdir(dataset)  # runs/ would land inside the dataset: refused, naming the default
    assert main(["train", "--data", ".", *TINY]) == 2
    assert "the default run folder (runs/ in the current folder) would be inside the dataset" in capsys.readouterr().err
    assert not (dataset / "runs").exists()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(dataset), "--fold", "all", *TINY, "--set", "train.epochs=1"]) == 0
    assert (tmp_path / "runs" / "tiny-default-all" / "run.json").is_file()


def test_default_run_folders_of_different_datasets_never_coincide(tmp_path: Path) -> None:
    from medgn.commands.train import default_run_dir

    names = ["Herz v2", "Herz_v2", "Herz:v2", "心脏", "肝脏", "###", "@@@"]
    folders = [default_run_dir(str(tmp_path / n), None, 0) for n in names]
    assert len(set(folders)) == len(names), folders
    assert folders[1] == str(Path("runs") / "Herz_v2-default-fold0") and folders[3].startswith(
        str(Path("runs") / "心脏-")
    )
    (tmp_path / "link").symlink_to(tmp_path / "Herz_v2")  # a link is named as typed, not after its target
    assert default_run_dir(str(tmp_path / "link") + "/", str(tmp_path / "cfg" / "cpu.yml"), -1) == str(
        Path("runs") / "link-cpu-all"
    )


def test_resuming_a_finished_run_writes_nothing(
    trained: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No new checkpoint, no re-decided post-processing, no rewritten config; a run killed before its end still ends."""

    def snapshot(run: Path) -> dict[str, bytes]:
        files = [*(run / "checkpoints").iterdir(), *(run / n for n in ("postprocessing.json", "train_summary.json"))]
        files += [run / "config.yaml", run / "plan.json"]
        return {p.name: p.read_bytes() for p in files}

    before = snapshot(trained)
    argv = ["train", "--data", str(dataset), "--out", str(trained), "--resume", *TINY]
    steps = ["--set", "train.epochs=3", "--set", "train.iters_per_epoch=6"]
    assert main([*argv, *steps, "--set", "train.lr=0.5"]) == 0
    assert "training stopped (already finished; nothing to do) at epoch 3, step 18" in capsys.readouterr().out
    assert snapshot(trained) == before
    # Killed after the last step's checkpoint, before the final validation wrote its outputs.
    killed = tmp_path / "killed"
    shutil.copytree(trained, killed)
    for name in ("checkpoints/final.json", "train_summary.json", "postprocessing.json"):
        (killed / name).unlink()
    argv = ["train", "--data", str(dataset), "--out", str(killed), "--resume", *TINY, *steps]
    assert main(argv) == 0
    assert "training stopped (finished) at epoch 3, step 18" in capsys.readouterr().out
    assert read_pointer(killed / "checkpoints", "final")["iteration"] == 18  # type: ignore[index]
    assert (killed / "postprocessing.json").is_file() and (killed / "train_summary.json").is_file()


def test_the_summary_records_the_schedules_length_and_more_epochs_extend_a_finished_run(
    trained: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = json.loads((trained / "train_summary.json").read_text())
    assert summary["planned_iters"] == 18 and summary["schedule_fitted_to_budget"] is False
    steps = ["--set", "train.iters_per_epoch=6"]
    # A summary of an earlier version (0 = epochs x iters, no flag) is still read that way.
    old = tmp_path / "old"
    shutil.copytree(trained, old)
    earlier = {k: v for k, v in summary.items() if k != "schedule_fitted_to_budget"}
    (old / "train_summary.json").write_text(json.dumps({**earlier, "planned_iters": 0}))
    argv = ["train", "--data", str(dataset), "--resume", *TINY, *steps]
    assert main([*argv, "--out", str(old), "--set", "train.epochs=3"]) == 0
    assert "already finished; nothing to do" in capsys.readouterr().out
    # Without a budget the config's epochs decide: one more epoch trains 6 more steps.
    more = tmp_path / "more"
    shutil.copytree(trained, more)
    assert main([*argv, "--out", str(more), "--set", "train.epochs=4"]) == 0
    assert "training stopped (finished) at epoch 4, step 24" in capsys.readouterr().out
    assert json.loads((more / "train_summary.json").read_text())["planned_iters"] == 24


def test_bad_data_found_on_resume_is_an_input_error_and_the_plan_is_the_runs(
    trained: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resume does not verify again: bad data surfaces while the patches are cached (exit 3, not 1).
    It trains on the run's own plan: one given with --plan at the start, whatever the data now says."""
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    label = nib.load(data / "labelsTr" / "c1.nii.gz")
    array = np.asanyarray(label.dataobj).copy()
    array[0, 0, 0] = 5  # a label value the plan does not know
    nib.save(nib.Nifti1Image(array, label.affine, label.header), data / "labelsTr" / "c1.nii.gz")
    argv = ["train", "--data", str(data), "--out", str(run), "--resume", *TINY, "--set", "train.epochs=4"]
    assert main([*argv, "--set", "train.iters_per_epoch=6"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "c1.nii.gz" in err[0] and "internal error" not in err[0]


def test_a_resume_trains_with_the_runs_own_plan(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "plans" / "plan.json"
    assert main(["plan", str(dataset), "--out", str(plan)]) == 0
    coarse = json.loads(plan.read_text())
    coarse["target_spacing"] = [2.0, 2.0, 2.5]  # not what the data would give
    plan.write_text(json.dumps(coarse))
    run = tmp_path / "run"
    steps = ["--set", "train.iters_per_epoch=3", "--set", "train.val_every=0"]
    argv = ["train", "--data", str(dataset), "--out", str(run), *TINY, *steps]
    assert main([*argv, "--plan", str(plan), "--set", "train.epochs=1"]) == 0
    assert json.loads((run / "plan.json").read_text())["target_spacing"] == [2.0, 2.0, 2.5]
    # resumed without --plan: the plan given at the start, not one made from the data again
    assert main([*argv, "--resume", "--set", "train.epochs=2"]) == 0
    assert "fingerprinting" not in (run / "medgn.log").read_text()
    assert json.loads((run / "plan.json").read_text())["target_spacing"] == [2.0, 2.0, 2.5]
    capsys.readouterr()
    # a resume that would change the plan is refused, the run untouched
    before = (run / "plan.json").read_bytes()
    assert main([*argv, "--resume", "--set", "train.epochs=3", "--set", "plan.target_spacing=[3,3,3]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another plan than its own" in err[0] and "target_spacing" in err[0]
    assert (run / "plan.json").read_bytes() == before
    assert read_pointer(run / "checkpoints", "latest")["iteration"] == 6  # type: ignore[index]
    # so is a resume given another --plan, which leaves the run's own plan as it was
    started = (run / "dataset_plan.json").read_bytes()
    other = tmp_path / "plans" / "other.json"
    other.write_text(json.dumps(dict(coarse, target_spacing=[1.0, 1.0, 1.0])))
    assert main([*argv, "--resume", "--plan", str(other), "--set", "train.epochs=3"]) == 2
    assert "another plan than its own" in capsys.readouterr().err
    assert (run / "dataset_plan.json").read_bytes() == started
    # a plan made for a dataset of two channels is refused before anything is trained or left behind
    two = dict(coarse, in_channels=2, normalization=coarse["normalization"] * 2)
    plan.write_text(json.dumps(two))
    new = ["train", "--data", str(dataset), "--out", str(tmp_path / "two"), "--plan", str(plan), *TINY]
    assert main(new) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the plan is for 2 input channel(s), the dataset has 1" in err[0]
    assert not (tmp_path / "two").exists()


def test_config_typo_names_the_key(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), "--set", "train.learning_rate=0.1"]) == 2
    )
    err = capsys.readouterr().err
    assert "train.learning_rate: unknown key" in err and "lr" in err
    assert not (tmp_path / "r").exists()


def test_bad_dataset_fails_verification_before_training(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = make_dataset(tmp_path / "bad", n=2)
    (bad / "labelsTr" / "c1.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "r"
    assert main(["train", "--data", str(bad), "--out", str(out), *TINY]) == 3
    err = capsys.readouterr().err
    assert "c1.nii.gz" in err and len(err.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists()
    # The run folder stays for its log, which lists every problem ("see medgn.log").
    assert "medgn.log" in err and "c1.nii.gz" in (out / "medgn.log").read_text()


def test_run_inside_dataset_is_refused(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(dataset), "--out", str(dataset / "run"), *TINY]) == 2
    assert not (dataset / "run").exists()


def test_bad_run_paths_and_folds_are_usage_errors_before_any_work(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --out that is a file or cannot be written, a cache inside the dataset, --fold -1."""
    (tmp_path / "a_file").write_text("keep")
    cases = [
        (["--out", str(tmp_path / "a_file")], "run folder exists and is not a folder"),
        (["--out", str(tmp_path / "a_file" / "run")], "run folder is not writable"),
        (["--out", str(tmp_path / "r"), "--set", f"data.cache_dir={dataset / 'cache'}"], "data.cache_dir: refusing"),
        (["--out", str(tmp_path / "r"), "--fold", "-1"], "--fold: invalid fold"),
    ]
    for extra, words in cases:
        assert main(["train", "--data", str(dataset), *TINY, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert (tmp_path / "a_file").read_text() == "keep"
    assert not (dataset / "cache").exists() and not (tmp_path / "r" / "checkpoints").exists()


def test_resume_keeps_the_run_fold_and_a_refused_new_run_leaves_no_folder(
    trained: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    assert json.loads((trained / "run.json").read_text()) == {"fold": 0}
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    for fold in ("1", "all"):  # validating on cases it trained on, or no longer validating
        argv = ["train", "--data", str(dataset), "--out", str(run), "--resume", "--fold", fold, *TINY]
        assert main([*argv, "--set", "train.epochs=3", "--set", "train.iters_per_epoch=6"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"trains on fold 0 (got {fold}, expected --fold 0 to resume it" in err[0], err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    # A run from before the record: no splits means it trained on every case.
    (run / "run.json").unlink()
    (run / "splits.json").unlink()
    argv = ["train", "--data", str(dataset), "--out", str(run), "--resume", "--fold", "0", *TINY]
    assert main([*argv, "--set", "train.epochs=3", "--set", "train.iters_per_epoch=6"]) == 2
    assert "trains on fold all" in capsys.readouterr().err
    # A new run refused once the dataset is read (fold out of range) leaves nothing behind.
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "new"), "--fold", "7", *TINY]) == 2
    assert "fold out of range" in capsys.readouterr().err and not (tmp_path / "new").exists()
    existing = tmp_path / "mine"
    existing.mkdir()  # a folder the user made stays
    assert main(["train", "--data", str(dataset), "--out", str(existing), "--fold", "7", *TINY]) == 2
    assert existing.is_dir() and not list(existing.iterdir())  # and nothing of the refused run in it
    # A plan left there (by an older version's refused run) is not taken by a new run on another dataset.
    other = make_dataset(tmp_path / "other", n=4, size=24)
    stale = json.loads((trained / "dataset_plan.json").read_text())
    stale["target_spacing"] = [9.0, 9.0, 9.0]
    (existing / "dataset_plan.json").write_text(json.dumps(stale))
    argv = ["train", "--data", str(other), "--out", str(existing), *TINY, "--set", "train.epochs=1"]
    assert main([*argv, "--set", "train.iters_per_epoch=2", "--set", "train.val_every=0"]) == 0
    assert json.loads((existing / "dataset_plan.json").read_text())["target_spacing"] != [9.0, 9.0, 9.0]


def test_resume_with_another_network_is_a_model_error_and_keeps_the_run(
    trained: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run = Path(shutil.copytree(trained, tmp_path / "run"))
    before = {p: p.read_bytes() for p in (run / "checkpoints").iterdir() if p.is_file()}
    argv = ["train", "--data", str(dataset), "--out", str(run), "--resume", *TINY, "--set", "model.features=[8,16]"]
    assert main(argv) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit this run's network" in err[0], err
    assert {p: p.read_bytes() for p in (run / "checkpoints").iterdir() if p.is_file()} == before


DRIVER = """
import sys
from medgn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _train_cmd(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        DRIVER,
        "train",
        "--data",
        str(dataset),
        "--out",
        str(out),
        *TINY,
        "--set",
        "train.epochs=2",
        "--set",
        "train.iters_per_epoch=5",
        "--set",
        "train.checkpoint_every_steps=2",
        "--set",
        "train.deterministic=true",
        "--set",
        "train.val_every=0",
        *extra,
    ]


def _state(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "final.json")


def test_kill_9_mid_epoch_then_resume_is_bit_exact(dataset: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: reductions in a fixed order
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert subprocess.run(_train_cmd(dataset, ref), env=env, capture_output=True, timeout=300).returncode == 0
    proc = subprocess.Popen(_train_cmd(dataset, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    # Kill once the step-4 checkpoint exists: the run is then mid-way through epoch 0 (5 steps).
    while time.monotonic() < deadline and proc.poll() is None:
        pointer = run / "checkpoints" / "latest.json"
        if pointer.exists() and "i0000004" in pointer.read_text():
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = subprocess.run(_train_cmd(dataset, run, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _state(ref), _state(run)
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key
    assert a["counters"]["iteration"] == b["counters"]["iteration"] == 10


@pytest.mark.data
@pytest.mark.slow
def test_short_cpu_run_on_four_la2018_cases(shared_data: Path, tmp_path: Path) -> None:
    la = shared_data / "LA2018"
    desc = json.loads((la / "dataset.json").read_text())
    subset = tmp_path / "la4"
    (subset / "imagesTr").mkdir(parents=True)
    (subset / "labelsTr").mkdir()
    cases = desc["training"][:4]
    for case in cases:
        for key, folder in (("image", "imagesTr"), ("label", "labelsTr")):
            name = Path(case[key]).name
            (subset / folder / name).symlink_to(la / folder / name)
    (subset / "dataset.json").write_text(json.dumps({**desc, "training": cases, "numTraining": 4, "test": []}))
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(subset),
        "--out",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
        "--set",
        "model.features=[8,16,32]",
        "--set",
        "plan.target_spacing=[2.5,2.5,2.5]",
        "--set",
        "plan.patch_size=[32,32,16]",
        "--set",
        "plan.n_folds=2",
        "--set",
        "data.num_workers=0",
        "--set",
        "train.optimizer=adamw",
        "--set",
        "train.lr=0.003",
        "--set",
        "train.epochs=3",
        "--set",
        "train.iters_per_epoch=8",
        "--set",
        "train.val_every=3",
        "--set",
        "train.amp=off",
    ]
    assert main(args) == 0
    epochs = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in line
    ]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert (out / "progress.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert read_pointer(out / "checkpoints", "final") is not None
    # Trained on every case (no held-out fold): post-processing from the labels' topology. Every
    # LA2018 atrium is one connected piece, so the largest-component filter is chosen.
    out_all = tmp_path / "run_all"
    assert main([*args[:4], str(out_all), *args[5:], "--fold", "all", "--set", "train.epochs=1"]) == 0
    decision = json.loads((out_all / "postprocessing.json").read_text())
    assert decision == {
        "lcc": {"1": True},
        "source": "reference topology",
        "evidence": {"1": {"one_piece": 4, "cases": 4}},
    }


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-resampled-voxels", "0"), ("--max-windows", "0"), ("--freeze-encoder-steps", "-3")],
)
def test_a_bad_flag_value_is_named_as_typed(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medgn: error: {flag}: value out of range (config ")
    assert not (tmp_path / "r").exists()


def test_more_folds_than_cases_are_said(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """plan.n_folds 5 on 4 cases made 4 folds without a word; --fold 4 then seemed a mistake of the user's."""
    argv = ["train", "--data", str(dataset), "--out", str(tmp_path / "new"), "--fold", "4", *TINY]
    assert main([*argv, "--set", "plan.n_folds=5"]) == 2
    err = capsys.readouterr().err
    assert "plan.n_folds is 5 but the dataset has 4 cases: 4 folds (0..3)" in err and "fold out of range" in err
