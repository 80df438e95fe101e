"""``medgn train --resume`` continues the run it finds or refuses before writing anything.

Settings that change what training computes are refused listing each key (exit 2) unless
``--allow-changed-settings``; the optimiser and the split never change; the data must be the run's
own (exit 3 naming the cases); the fold is checked against the checkpoint as well as run.json; a
lost ``latest.json`` falls back to the newest intact checkpoint and a damaged one names it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from torch import nn

from medgn.checkpoint import load_checkpoint, read_pointer, save_checkpoint
from medgn.cli import main
from medgn.data.datasets import Case, DatasetIndex, load_dataset
from medgn.data.verify import verify_dataset
from medgn.errors import ModelError
from medgn.train.config import TrainConfig
from medgn.train.trainer import Trainer
from medgn.workflows import data_record
from tests.workflows.test_run_training import TINY, make_dataset

# 2 epochs of 2 steps, no validation: a run of a few seconds.
SHORT = [*TINY, "--set", "train.iters_per_epoch=2", "--set", "train.val_every=0"]


def _train(data: Path, out: Path, *extra: str, patch: bool = True) -> int:
    """``medgn train`` with the short settings; ``patch=False`` leaves plan.patch_size to the plan."""
    sets = list(SHORT)
    if not patch:
        at = sets.index("plan.patch_size=[16,16,16]")
        del sets[at - 1 : at + 1]  # the "--set" before it too
    return main(["train", "--data", str(data), "--out", str(out), *sets, *extra])


def _snapshot(run: Path) -> dict[str, bytes]:
    """The bytes of everything a refused resume must leave alone."""
    files = [run / n for n in ("config.yaml", "plan.json", "run.json", "splits.json") if (run / n).exists()]
    files += [p for p in (run / "checkpoints").iterdir() if p.is_file()]
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medgn: error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fold-0 AdamW run of 2 epochs (4 steps)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert _train(dataset, out, "--set", "train.epochs=2") == 0
    return out


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


def test_checkpoints_record_the_fold_and_the_dataset(trained: Path, dataset: Path) -> None:
    record = load_checkpoint(trained / "checkpoints" / "latest.json")["run"]
    assert record["fold"] == 0
    assert sorted(record["data"]["cases"]) == ["c0", "c1", "c2", "c3"]
    entry = record["data"]["cases"]["c1"]["label"]
    assert entry["path"] == os.path.join("labelsTr", "c1.nii.gz")
    assert entry["size"] == (dataset / "labelsTr" / "c1.nii.gz").stat().st_size
    assert json.loads((trained / "run.json").read_text()) == {"fold": 0}


@pytest.mark.parametrize(
    ("override", "code", "words"),
    [
        ("train.optimizer=sgd", 2, ["train.optimizer: a resume cannot change it", "'adamw' -> 'sgd'"]),
        ("train.lr=0.5", 2, ["train.lr 0.01 -> 0.5", "--allow-changed-settings"]),
        ("train.batch_size=1", 2, ["train.batch_size 2 -> 1"]),
        ("train.seed=7", 2, ["train.seed 0 -> 7"]),
        ("train.iters_per_epoch=3", 2, ["train.iters_per_epoch 2 -> 3"]),
        ("data.prob_flip=0.1", 2, ["data.prob_flip 0.5 -> 0.1"]),
        ("plan.n_folds=3", 2, ["plan.n_folds: a resume cannot change it", "splits.json"]),
        ("model.activation=relu", 4, ["does not fit this run's network", "model.activation 'leaky_relu' -> 'relu'"]),
        ("model.features=[8,16]", 4, ["does not fit this run's network", "model.features [4, 8] -> [8, 16]"]),
    ],
)
def test_a_resume_that_changes_the_computation_is_refused_before_anything_is_written(
    run: Path, dataset: Path, capsys: pytest.CaptureFixture[str], override: str, code: int, words: list[str]
) -> None:
    before = _snapshot(run)
    assert _train(dataset, run, "--resume", "--set", "train.epochs=3", "--set", override) == code
    err = _one_error(capsys)
    for word in words:
        assert word in err, err
    assert "internal error" not in err
    assert _snapshot(run) == before  # config.yaml not rewritten, no checkpoint written


def test_every_changed_setting_is_listed_and_the_opt_in_records_them(
    run: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changes = ["--set", "train.lr=0.5", "--set", "train.batch_size=1", "--set", "train.seed=7"]
    assert _train(dataset, run, "--resume", "--set", "train.epochs=3", *changes) == 2
    err = _one_error(capsys)
    assert "3 setting(s)" in err
    assert all(w in err for w in ("train.lr 0.01 -> 0.5", "train.batch_size 2 -> 1", "train.seed 0 -> 7")), err
    # Opted in: trained on, the list shown as a warning and recorded in run.json and the checkpoints.
    assert _train(dataset, run, "--resume", "--set", "train.epochs=3", *changes, "--allow-changed-settings") == 0
    err = capsys.readouterr().err
    assert "medgn: warning: resuming at step 4 with changed settings" in err and "train.lr 0.01 -> 0.5" in err
    changed = {"train.batch_size": [2, 1], "train.lr": [0.01, 0.5], "train.seed": [0, 7]}
    assert json.loads((run / "run.json").read_text())["changed_settings"] == [{"iteration": 4, "changes": changed}]
    state = load_checkpoint(run / "checkpoints" / "latest.json")
    assert state["counters"]["iteration"] == 6
    assert state["run"]["changed_settings"] == [{"iteration": 4, "changes": changed}]
    assert "lr: 0.5" in (run / "config.yaml").read_text()
    assert "changed settings" in (run / "medgn.log").read_text()
    # Going back is a change again.
    assert _train(dataset, run, "--resume", "--set", "train.epochs=4") == 2
    assert "train.lr 0.5 -> 0.01" in _one_error(capsys)


def test_settings_that_extend_or_observe_the_run_may_change(run: Path, dataset: Path) -> None:
    free = [
        "--set",
        "train.epochs=3",
        "--set",
        "train.log_every=2",
        "--set",
        "train.checkpoint_every_minutes=5",
        "--set",
        "train.keep_checkpoints=3",
        "--set",
        "data.limits.max_windows=100000",
        "--time-budget",
        "30m",
    ]
    assert _train(dataset, run, "--resume", *free) == 0
    assert load_checkpoint(run / "checkpoints" / "latest.json")["counters"]["iteration"] == 6
    config = (run / "config.yaml").read_text()
    assert "epochs: 3" in config and "log_every: 2" in config
    assert json.loads((run / "run.json").read_text()) == {"fold": 0}


def test_a_resume_on_other_data_is_refused_naming_the_cases(
    run: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(run)
    other = make_dataset(tmp_path / "other", size=24)  # the same case ids, other volumes
    assert _train(other, run, "--resume", "--set", "train.epochs=3") == 3
    err = _one_error(capsys)
    assert "is not the one the run trained on: 4 case(s) changed" in err
    assert os.path.join("imagesTr", "c0.nii.gz") in err and "internal error" not in err
    # One case edited in a copy: named with its file.
    edited = Path(shutil.copytree(dataset, tmp_path / "edited"))
    image = nib.load(edited / "imagesTr" / "c2.nii.gz")
    array = np.asanyarray(image.dataobj) + 1.0
    nib.save(nib.Nifti1Image(array, image.affine, image.header), edited / "imagesTr" / "c2.nii.gz")
    assert _train(edited, run, "--resume", "--set", "train.epochs=3") == 3
    err = _one_error(capsys)
    assert f"1 case(s) changed (c2: {os.path.join('imagesTr', 'c2.nii.gz')})" in err
    # Cases removed.
    (edited / "imagesTr" / "c2.nii.gz").unlink()
    (edited / "labelsTr" / "c2.nii.gz").unlink()
    desc = json.loads((edited / "dataset.json").read_text())
    desc["training"] = [t for t in desc["training"] if "c2" not in t["image"]]
    desc["numTraining"] = 3
    (edited / "dataset.json").write_text(json.dumps(desc))
    assert _train(edited, run, "--resume", "--set", "train.epochs=3") == 3
    assert "1 case(s) removed (c2)" in _one_error(capsys)
    assert _snapshot(run) == before
    # A copy of the same files (new modification times, other folder) is the same data.
    copy = Path(shutil.copytree(dataset, tmp_path / "copy", copy_function=shutil.copyfile))
    assert _train(copy, run, "--resume", "--set", "train.epochs=3") == 0


def test_a_run_on_every_case_is_not_resumed_on_a_larger_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small, large = make_dataset(tmp_path / "small", n=2), make_dataset(tmp_path / "large", n=4)
    run = tmp_path / "run"
    assert _train(small, run, "--fold", "all", "--set", "train.epochs=1") == 0
    capsys.readouterr()
    assert _train(large, run, "--fold", "all", "--resume", "--set", "train.epochs=2") == 3
    assert "2 case(s) added (c2, c3)" in _one_error(capsys)


@pytest.mark.parametrize("damage", ["malformed", "other fold", "deleted"])
def test_the_fold_is_checked_against_the_checkpoint_too(
    run: Path, dataset: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    record = run / "run.json"
    if damage == "malformed":
        record.write_text('{"fold": "x"}')
    elif damage == "other fold":
        record.write_text('{"fold": 1}')
    else:
        record.unlink()
    before = _snapshot(run)
    assert _train(dataset, run, "--resume", "--fold", "1", "--set", "train.epochs=3") == 2
    err = _one_error(capsys)
    expected = {
        "malformed": "run.json: malformed run record (got fold 'x'",
        "other fold": "run.json: the run's record says fold 1, its checkpoint fold 0",
        "deleted": "--fold: the run in",
    }[damage]
    assert expected in err, err
    assert _snapshot(run) == before
    if damage == "deleted":  # the checkpoint's fold resumes, and run.json is restored
        assert "trains on fold 0 (got 1" in err
        assert _train(dataset, run, "--resume", "--fold", "0", "--set", "train.epochs=3") == 0
        assert json.loads(record.read_text()) == {"fold": 0}


def test_a_checkpoint_from_before_the_run_record_resumes_with_a_warning(
    run: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = run / "checkpoints"
    state = load_checkpoint(folder / "latest.json")
    del state["run"]
    save_checkpoint(state, folder, tag="step", pointers=("latest",))
    assert _train(dataset, run, "--resume", "--set", "train.epochs=3") == 0
    assert "records no dataset fingerprint (an older medgn)" in capsys.readouterr().err
    resumed = load_checkpoint(folder / "latest.json")
    assert resumed["counters"]["iteration"] == 6 and resumed["run"]["fold"] == 0
    assert sorted(resumed["run"]["data"]["cases"]) == ["c0", "c1", "c2", "c3"]


def test_a_lost_latest_pointer_resumes_from_the_newest_intact_checkpoint(
    run: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = run / "checkpoints"
    newest = read_pointer(folder, "latest")["file"]  # type: ignore[index]
    (folder / "latest.json").unlink()
    # Still a run: a new one is refused there.
    assert _train(dataset, run) == 2
    assert "already has checkpoints" in _one_error(capsys)
    assert _train(dataset, run, "--resume", "--set", "train.epochs=3") == 0
    err = capsys.readouterr().err
    assert f"latest.json is missing: resuming from the newest intact checkpoint, {newest}" in err
    assert read_pointer(folder, "latest")["iteration"] == 6  # type: ignore[index]


def test_a_damaged_latest_checkpoint_names_the_intact_one_before_it(
    run: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = run / "checkpoints"
    latest = folder / read_pointer(folder, "latest")["file"]  # type: ignore[index]
    intact = [p.name for p in folder.glob("e*-i*.pt") if p != latest]
    raw = bytearray(latest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    latest.write_bytes(bytes(raw))
    assert _train(dataset, run, "--resume", "--set", "train.epochs=3") == 4
    err = _one_error(capsys)
    assert "does not match its recorded sha256" in err and "is intact: remove" in err
    named = err.split("the earlier checkpoint ")[1].split()[0]
    assert named in intact, (named, intact)
    (folder / "latest.json").unlink()  # as the message says
    assert _train(dataset, run, "--resume", "--set", "train.epochs=3") == 0
    assert f"newest intact checkpoint, {named}" in capsys.readouterr().err


def test_init_from_with_resume_and_the_opt_in_without_resume_are_usage_errors(
    run: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(run)
    assert _train(dataset, run, "--resume", "--init-from", str(run)) == 2
    assert "--init-from: cannot be combined with --resume" in _one_error(capsys)
    assert _train(dataset, run.parent / "new", "--allow-changed-settings") == 2
    assert "--allow-changed-settings: only applies to --resume" in _one_error(capsys)
    assert _snapshot(run) == before and not (run.parent / "new").exists()


def test_the_trainer_refuses_another_optimisers_state() -> None:
    """Loaded into SGD, AdamW's state lacks momentum: a model error, not a KeyError at the next step."""

    def trainer(optimizer: str) -> Trainer:
        cfg = TrainConfig(optimizer=optimizer, amp="off", epochs=1, iters_per_epoch=1)  # type: ignore[arg-type]
        return Trainer(nn.Conv3d(1, 2, 1), cfg, lambda epoch, start: iter(()))

    state = trainer("adamw").state_dict()
    with pytest.raises(ModelError, match="lacks dampening, momentum: it was written by another optimiser"):
        trainer("sgd").resume("checkpoint.pt", state=state)


def _index(root: Path, n: int = 2) -> DatasetIndex:
    cases = []
    for i in range(n):
        image, label = root / f"img{i}.bin", root / f"lab{i}.bin"
        for path in (image, label):
            if not path.exists():
                path.write_bytes(bytes([i]) * 64)
        cases.append(Case(f"c{i}", (image,), label))
    return DatasetIndex(root, "folders", "t", ("x",), ("MR",), {}, cases)


def test_the_record_reads_a_file_only_when_its_size_or_time_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = _index(tmp_path)
    record = data_record.record_dataset(index)
    calls: list[Path] = []
    original = data_record.path_sha256
    monkeypatch.setattr(data_record, "path_sha256", lambda p: calls.append(Path(p)) or original(p))
    current, changes = data_record.dataset_changes(record, index)
    assert not changes and calls == [] and current["sha256"] == record["sha256"]
    # Same size, other bytes, another time: read and found changed.
    path = tmp_path / "lab1.bin"
    path.write_bytes(bytes([9]) * 64)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    _, changes = data_record.dataset_changes(record, index)
    assert calls == [path] and changes.changed == {"c1": ["lab1.bin"]} and bool(changes)
    # A new time on the same bytes: read, and unchanged.
    path.write_bytes(bytes([1]) * 64)
    calls.clear()
    _, changes = data_record.dataset_changes(record, index)
    assert calls == [path] and not changes


def test_the_record_digest_ignores_paths_and_times(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = data_record.record_dataset(_index(a))
    second = data_record.record_dataset(_index(b))
    assert first["sha256"] == second["sha256"]
    (b / "img0.bin").write_bytes(b"\x00" * 65)
    third = data_record.record_dataset(_index(b))
    assert third["sha256"] != first["sha256"]
    assert data_record.dataset_changes(first, _index(b))[1].describe() == "1 case(s) changed (c0: img0.bin)"


@pytest.fixture(scope="module")
def planned(dataset: Path, trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained from a --plan (the fixture run's plan.json) with no plan.* override: its network is
    the plan's own (plan.patch_size would make a new one from the patch)."""
    out = tmp_path_factory.mktemp("runs") / "planned"
    given = out.parent / "given_plan.json"
    shutil.copyfile(trained / "plan.json", given)
    assert _train(dataset, out, "--plan", str(given), "--set", "train.epochs=1", patch=False) == 0
    return out


@pytest.mark.parametrize(
    ("key", "index", "value"),
    [("kernel_sizes", 0, [3, 3, 1]), ("strides", 1, [2, 2, 1])],
)
def test_a_plan_with_another_network_is_refused_before_anything_is_written(
    planned: Path,
    dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    key: str,
    index: int,
    value: list,
) -> None:
    run = Path(shutil.copytree(planned, tmp_path / "run"))
    plan = json.loads((run / "plan.json").read_text())
    old = plan["network"][key][index]
    assert old != value
    plan["network"][key][index] = value  # only the network differs: the plan's other keys are the run's
    other = tmp_path / "other_plan.json"
    other.write_text(json.dumps(plan))
    before = _snapshot(run)
    args = ("--resume", "--set", "train.epochs=2", "--plan", str(other))
    assert _train(dataset, run, *args, patch=False) == 4
    err = _one_error(capsys)
    assert "does not fit the network of this run's plan" in err, err
    assert f"network.{key} " in err and str(old) in err and str(value) in err, err
    assert str(run / "plan.json") in err, err  # the plan to resume with
    assert _snapshot(run) == before  # config.yaml and plan.json not rewritten, no checkpoint written


def test_a_resume_without_the_runs_settings_is_told_to_repeat_them(
    run: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(run)
    # No --set at all: the defaults make another network than the run's model.features=[4,8].
    assert main(["train", "--data", str(dataset), "--out", str(run), "--resume", "--device", "cpu"]) == 4
    err = _one_error(capsys)
    assert "model.features [4, 8] -> [32" in err, err
    assert "no --set model" not in err, err  # the user gave none
    assert "repeat its --config and --set options" in err and f"--config {run / 'config.yaml'}" in err, err
    assert _snapshot(run) == before
    # What the hint says works: the run's config.yaml resumes it.
    args = ["--config", str(run / "config.yaml"), "--set", "train.epochs=3", "--no-progress", "--device", "cpu"]
    assert main(["train", "--data", str(dataset), "--out", str(run), "--resume", *args]) == 0
    trained_to = json.loads(before["checkpoints/latest.json"])["file"]
    assert read_pointer(run / "checkpoints")["file"] not in (None, trained_to)


def test_a_fifo_as_checkpoint_is_named_not_opened(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "model.pt"
    os.mkfifo(path)  # opening it would block until a writer came: it must only be named
    words = "checkpoint path is neither a regular file nor a folder (a FIFO, socket or device)"
    with pytest.raises(ModelError, match=r"neither a regular file nor a folder \(a FIFO"):
        load_checkpoint(path)  # what --model reads it with (read_checkpoint)
    out = tmp_path / "new"
    assert _train(dataset, out, "--init-from", str(path)) == 4
    err = _one_error(capsys)
    assert words in err and "not found" not in err, err
    assert not out.exists()


def test_a_changed_raw_file_of_a_metaimage_header_is_a_changed_case(tmp_path: Path) -> None:
    """The .mhd header stays the same when its .raw data change: the record covers the data file."""
    index = _index(tmp_path)
    header = tmp_path / "img0.mhd"
    header.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\nElementDataFile = img0.raw\n"
    )
    raw = tmp_path / "img0.raw"
    raw.write_bytes(bytes([3]) * 64)
    index.cases[0] = Case("c0", (header,), index.cases[0].label)
    record = data_record.record_dataset(index)
    stat = header.stat()
    raw.write_bytes(bytes([4]) * 64)  # same size, other voxels; the header untouched
    os.utime(raw, ns=(raw.stat().st_atime_ns, stat.st_mtime_ns + 10**9))
    _, changes = data_record.dataset_changes(record, index)
    assert changes.changed == {"c0": ["img0.mhd"]}


def test_the_record_takes_the_sha256_verification_read_without_reading_again(
    dataset: Path, trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new run hashes each file from the bytes verification reads; the record is the same."""
    index = load_dataset(dataset)
    fresh = data_record.record_dataset(index)
    assert load_checkpoint(trained / "checkpoints" / "latest.json")["run"]["data"]["sha256"] == fresh["sha256"]
    report = verify_dataset(index, digests=True)
    assert len(report.sha256) == 2 * len(index.cases)  # each case's image and label
    calls: list[Path] = []
    monkeypatch.setattr(data_record, "path_sha256", lambda p: calls.append(Path(p)) or "never")
    assert data_record.record_dataset(index, read=report.sha256) == fresh
    assert calls == []
    # Without a digest for a file (a 4D MSD image is not hashed by verification), it is read.
    partial = {k: v for k, v in report.sha256.items() if not k.endswith(os.path.join("labelsTr", "c1.nii.gz"))}
    data_record.record_dataset(index, read=partial)
    assert calls == [dataset / "labelsTr" / "c1.nii.gz"]
    assert verify_dataset(index).sha256 == {}  # only taken when asked
