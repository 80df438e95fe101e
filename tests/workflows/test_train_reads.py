"""``medgn train`` reads each volume at most twice before the first step (verify + fingerprint in
one pass, then the patch cache), verifies on rank 0 only once, and trains on the folds that
``medgn plan`` wrote next to the plan."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medgn.data.io
import medgn.workflows.run_data as run_data
import medgn.workflows.train as workflow
from medgn.cli import main
from medgn.data.datasets import load_dataset
from medgn.data.verify import verify_dataset
from medgn.planning.fingerprint import aggregate_fingerprint, compute_fingerprint
from tests.workflows.test_run_training import TINY, make_dataset

ONE_STEP = [*TINY, "--set", "train.epochs=1", "--set", "train.iters_per_epoch=1"]


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> tuple[Counter, list[Counter]]:
    """(pixel reads per file so far, the counts when the trainer was asked for its first step)."""
    counts: Counter = Counter()
    at_first_step: list[Counter] = []
    original = medgn.data.io._read_pixels

    def counting(info, raw=None):  # type: ignore[no-untyped-def]
        counts[Path(info.path).name if "imagesTr" in str(info.path) else "label/" + Path(info.path).name] += 1
        return original(info, raw)

    class Snapshot(workflow.Trainer):  # type: ignore[misc, name-defined]
        def train(self):  # type: ignore[no-untyped-def]
            at_first_step.append(Counter(counts))
            return super().train()

    monkeypatch.setattr(medgn.data.io, "_read_pixels", counting)
    monkeypatch.setattr(workflow, "Trainer", Snapshot)
    return counts, at_first_step


def test_at_most_two_reads_per_volume_before_the_first_step(
    tmp_path: Path, reads: tuple[Counter, list[Counter]]
) -> None:
    data = make_dataset(tmp_path / "tiny")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *ONE_STEP]) == 0
    (snapshot,) = reads[1]
    assert len(snapshot) == 8  # 4 images and 4 labels, every one read
    assert max(snapshot.values()) <= 2, snapshot
    # The plan was made without a separate fingerprint pass: its fingerprint covers every case.
    plan = json.loads((tmp_path / "run" / "dataset_plan.json").read_text())
    assert plan["fingerprint"]["num_cases"] == 4 and plan["schema_version"] == 1


def test_resume_does_not_verify_again_unless_asked(
    tmp_path: Path, reads: tuple[Counter, list[Counter]], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_dataset(tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *ONE_STEP]) == 0
    calls: list[int] = []
    original = run_data.verify_dataset
    monkeypatch.setattr(run_data, "verify_dataset", lambda *a, **k: calls.append(1) or original(*a, **k))
    more = [*TINY, "--set", "train.epochs=2", "--set", "train.iters_per_epoch=1"]
    assert main(["train", "--data", str(data), "--out", str(out), "--resume", *more]) == 0
    assert calls == []
    more = [*TINY, "--set", "train.epochs=3", "--set", "train.iters_per_epoch=1"]
    assert main(["train", "--data", str(data), "--out", str(out), "--resume", "--verify", *more]) == 0
    assert calls == [1]


def test_fingerprint_from_verification_equals_a_separate_pass(tmp_path: Path) -> None:
    index = load_dataset(make_dataset(tmp_path / "tiny"))
    report = verify_dataset(index, stats_seed=0)
    assert report.stats is not None
    assert aggregate_fingerprint(index, report.stats) == compute_fingerprint(index, seed=0)
    assert verify_dataset(index).stats is None  # no seed: no statistics kept


def test_training_uses_the_folds_medgn_plan_wrote(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "tiny")
    plans = tmp_path / "plans"
    plans.mkdir()
    assert main(["plan", str(data), "--out", str(plans / "plan.json"), "--folds", "4", "--seed", "3"]) == 0
    planned = json.loads((plans / "splits.json").read_text())
    assert len(planned) == 4  # the run config says plan.n_folds=2: the plan's folds win
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(out),
                "--plan",
                str(plans / "plan.json"),
                "--fold",
                "3",
                *ONE_STEP,
            ]
        )
        == 0
    )
    assert json.loads((out / "splits.json").read_text()) == planned
    log = (out / "medgn.log").read_text()
    assert "fold 3: 3 training and 1 validation cases" in log


def test_a_plan_of_another_dataset_is_refused_with_advice_about_the_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, other = make_dataset(tmp_path / "tiny"), make_dataset(tmp_path / "other", n=5)
    assert main(["plan", str(other), "--out", str(tmp_path / "plans" / "plan.json")]) == 0
    capsys.readouterr()
    argv = [
        "train",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--plan",
        str(tmp_path / "plans" / "plan.json"),
    ]
    assert main([*argv, *ONE_STEP]) == 3
    err = capsys.readouterr().err
    assert "splits do not match the dataset's cases" in err and "a --plan made from this dataset" in err, err


def test_train_deep_supervision_switches_the_heads_off(tmp_path: Path) -> None:
    import torch

    data = make_dataset(tmp_path / "tiny")
    runs = {}
    for flag in ("true", "false"):
        out = tmp_path / f"run_{flag}"
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(data),
                    "--out",
                    str(out),
                    *ONE_STEP,
                    "--set",
                    "model.deep_supervision=true",
                    "--set",
                    f"train.deep_supervision={flag}",
                ]
            )
            == 0
        )
        state = torch.load(next((out / "checkpoints").glob("*.pt")), weights_only=True)
        runs[flag] = state["config"]["model"]["deep_supervision"]
    # The network was built (and is rebuilt for inference) from this config: heads on only when both say so.
    assert runs == {"true": True, "false": False}


def test_a_plan_of_other_channel_names_is_recorded_with_the_datasets_own(tmp_path: Path) -> None:
    # A --plan from a dataset naming its channel otherwise left the other names in the run's plan:
    # inference then judged channel order by names the model never saw.
    data = make_dataset(tmp_path / "data", n=4, size=16)
    other = make_dataset(tmp_path / "other", n=4, size=16)
    desc = json.loads((other / "dataset.json").read_text())
    desc["modality"], desc["name"], desc["labels"] = {"0": "T1"}, "other", {"0": "background", "1": "thing"}
    (other / "dataset.json").write_text(json.dumps(desc))
    plan = tmp_path / "plans" / "plan.json"
    assert main(["plan", str(other), "--out", str(plan), "--folds", "2"]) == 0
    run = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(run), "--plan", str(plan), *ONE_STEP, "--no-progress"])
    assert code == 0
    record = json.loads((run / "plan.json").read_text())["dataset"]
    assert record["channel_names"] == ["MRI"] and record["name"] == "tiny" and record["modalities"] == ["MR"]
    assert record["labels"] == {"background": 0, "cube": 1}  # the names a DICOM-SEG's segments get


def test_a_plan_naming_the_datasets_channels_in_another_order_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its normalisations follow its own order, and the model would record the swapped names.
    from tests.data.conftest import make_nnunet

    data = make_nnunet(tmp_path / "data", n_cases=2, channels=2)  # CT, T2
    other = make_nnunet(tmp_path / "other", n_cases=2, channels=2)
    desc = json.loads((other / "dataset.json").read_text())
    desc["channel_names"] = {"0": "T2", "1": "CT"}
    (other / "dataset.json").write_text(json.dumps(desc))
    plan = tmp_path / "plans" / "plan.json"
    assert main(["plan", str(other), "--out", str(plan)]) == 0
    capsys.readouterr()
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--plan",
            str(plan),
            "--fold",
            "all",
            *ONE_STEP,
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2
        and "the plan names the dataset's channels in another order: T2, CT; the dataset has CT, T2" in err[-1]
    )


def test_a_plan_with_other_label_values_keeps_its_label_names(tmp_path: Path) -> None:
    # The dataset's names replaced the plan's although they named other values: class 2 lost its name.
    data = make_dataset(tmp_path / "data", n=4, size=16)
    other = make_dataset(tmp_path / "other", n=4, size=16)
    desc = json.loads((other / "dataset.json").read_text())
    desc["labels"] = {"0": "background", "1": "cube", "2": "ball"}
    (other / "dataset.json").write_text(json.dumps(desc))
    label = nib.load(other / "labelsTr" / "c0.nii.gz")
    array = np.asarray(label.dataobj).copy()
    array[0, 0, 0] = 2
    nib.save(nib.Nifti1Image(array, label.affine, label.header), other / "labelsTr" / "c0.nii.gz")
    plan = tmp_path / "plans" / "plan.json"
    assert main(["plan", str(other), "--out", str(plan), "--folds", "2"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--plan", str(plan), *ONE_STEP, "--no-progress"]) == 0
    saved = json.loads((run / "plan.json").read_text())
    assert saved["label_values"] == [0, 1, 2] and saved["dataset"]["labels"] == {"background": 0, "cube": 1, "ball": 2}
