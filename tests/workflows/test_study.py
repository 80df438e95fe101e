"""``medgn study norms`` on a tiny synthetic dataset: one row per run, table and plot written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from test_run_training import make_dataset

from medgn.cli import main
from tests.tiny_config import tiny_sets


def test_norm_study_two_norms_two_batch_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_dataset(tmp_path / "data", n=4, size=16)
    out = tmp_path / "study"
    argv = [
        "study",
        "norms",
        "--data",
        str(data),
        "--out",
        str(out),
        "--norms",
        "batch,group",
        "--batch-sizes",
        "1,2",
        "--iterations",
        "4",
        "--device",
        "cpu",
        "--lr-scaling",
        "linear",
        *tiny_sets({"train.optimizer": "adamw", "train.checkpoint_every_minutes": "0"}),
    ]
    assert main(argv) == 0
    with open(out / "study.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["norm"], r["batch_size"]) for r in rows] == [
        ("batch", "1"),
        ("batch", "2"),
        ("group", "1"),
        ("group", "2"),
    ]
    assert {r["seed"] for r in rows} == {"0"}  # the config's seed when --seeds is not given
    # Same samples seen by every run: 4 steps at batch 1, 2 steps at batch 2.
    assert [r["iterations"] for r in rows] == ["4", "2", "4", "2"]
    assert all(r["samples_seen"] == "4" for r in rows)
    # Linear scaling: batch 2 trains at twice the base learning rate (config default 0.01).
    assert [float(r["lr"]) for r in rows] == [0.01, 0.02, 0.01, 0.02]
    assert all(0.0 <= float(r["val_dice_mean"]) <= 1.0 for r in rows)
    table = (out / "study.md").read_text()
    assert "| batch |" in table and "| group |" in table and "batch 1 | batch 2" in table
    png = (out / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    saved = json.loads((out / "study.json").read_text())
    assert len(saved["rows"]) == 4
    # Each run trained the norm it says it did.
    for norm in ("batch", "group"):
        config = (out / "runs" / f"{norm}_b1_s0" / "config.yaml").read_text()
        assert f"norm: {norm}" in config
    # The same folder again: refused before any run, the results untouched.
    capsys.readouterr()
    before = (out / "study.csv").read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds the runs of an earlier study (4)" in err[0] and "--resume" not in err[0]
    assert (out / "study.csv").read_bytes() == before


def test_batch_sizes_must_be_integers(tmp_path: Path, capsys) -> None:
    assert main(["study", "norms", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err


def test_group_rule_arms_set_the_model_section() -> None:
    from medgn.errors import UsageError
    from medgn.models.config import UNet3DConfig
    from medgn.workflows.study import norm_arm

    base = UNet3DConfig(features=(16, 32))
    assert norm_arm(base, "group:cpg4") == UNet3DConfig(features=(16, 32), norm="group", group_channels=4)
    assert norm_arm(base, "group_torch:g32") == UNet3DConfig(features=(16, 32), norm="group_torch", num_groups=32)
    assert norm_arm(base, "instance").norm == "instance"
    for bad in ("group:cpgx", "batch:g32", "group:h4"):
        with pytest.raises(UsageError, match="group rule"):
            norm_arm(base, bad)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--batch-sizes", "1,0"], "--batch-sizes: value out of range"),
        (["--seeds", "-1"], "--seeds: value out of range"),
        (["--seeds", "1099511627776"], "--seeds: value out of range"),
        (["--norms", "group:cpg0"], "invalid arm 'group:cpg0'"),
        (["--fold", "all"], "needs a validation fold"),
        (["--fold", "-1"], "--fold: invalid fold"),
        (["--norms", "group,batch,group"], "--norms: group given twice"),
        (["--batch-sizes", "1,2,1"], "--batch-sizes: 1 given twice"),
        (["--seeds", "0,0"], "--seeds: 0 given twice"),
        (["--batch-sizes", "2048"], "--batch-sizes: value out of range"),
        (["--iterations", "0"], "--iterations: out of range"),
        (["--iterations", "100001"], "--iterations: out of range"),
        (["--iterations", "2000", "--batch-sizes", "1000"], "samples per run, more than one epoch may hold"),
        (["--seeds", ""], "--seeds: empty list"),
        # Steps the batch sizes cannot share were rounded to other step counts without a word.
        (
            ["--iterations", "3", "--batch-sizes", "2,4"],
            "3 steps at batch 2 are 6 samples, which not every batch size (2,4) divides "
            "(expected a multiple of 2, e.g. 2 or 4)",
        ),
        (["--iterations", "1", "--batch-sizes", "3,4"], "expected a multiple of 4, e.g. 4)"),
        (["--iterations", "100000", "--batch-sizes", "1,3"], "expected a multiple of 3, e.g. 99999)"),
        (["--set", "train.grad_accum=2"], "train.grad_accum: a norm study compares batch sizes"),
        # A scaled learning rate above train.lr's bound was trained although --set refuses it.
        (["--set", "train.lr=5", "--lr-scaling", "linear", "--batch-sizes", "1,4"], "the arm at batch 4: "),
    ],
)
def test_study_values_are_checked_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], words: str
) -> None:
    assert main(["study", "norms", "--data", str(tmp_path), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_study_whose_first_arm_is_refused_leaves_no_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_dataset(tmp_path / "data", n=4, size=16)
    out = tmp_path / "study"
    argv = ["study", "norms", "--data", str(data), "--out", str(out), "--norms", "group", "--batch-sizes", "1"]
    assert main([*argv, "--iterations", "2", "--fold", "7"]) == 2  # the dataset has no fold 7
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("medgn: warning:")]
    assert len(err) == 1 and "fold out of range" in err[0]  # (a warning says 5 folds became 4)
    assert not out.exists()


def test_every_arm_warms_up_over_the_same_samples() -> None:
    from medgn.config import load_run_config
    from medgn.workflows.study import arm_config

    cfg = load_run_config(None, ["train.warmup_iters=8", "train.lr=0.01"])
    arms = {b: arm_config(cfg, cfg.model, 0, b, 64, 1, "linear").train for b in (1, 2, 4)}
    assert [(t.warmup_iters, t.iters_per_epoch, t.lr) for t in arms.values()] == [
        (8, 64, 0.01),
        (4, 32, 0.02),
        (2, 16, 0.04),
    ]
    short = arm_config(cfg, cfg.model, 0, 4, 8, 1, "none").train  # 2 steps: no warmup as long as the run
    assert (short.warmup_iters, short.lr) == (1, 0.01)
    one = load_run_config(None, ["train.warmup_iters=1"])  # rounded up: a warmup never vanishes
    assert [arm_config(one, one.model, 0, b, 64, 1, "none").train.warmup_iters for b in (1, 2, 4)] == [1, 1, 1]


def test_an_earlier_studys_tables_go_when_a_new_study_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its runs/ removed as advised, an interrupted new study left the old table beside the new runs.
    data = make_dataset(tmp_path / "data", n=4, size=16)
    out = tmp_path / "study"
    out.mkdir()
    for name in ("study.csv", "study.json", "study.md", "study.png"):
        (out / name).write_text("old")
    argv = ["study", "norms", "--data", str(data), "--out", str(out), "--norms", "group", "--batch-sizes", "1"]
    assert main([*argv, "--iterations", "2", "--fold", "7"]) == 2  # the first arm is refused
    assert sorted(p.name for p in out.iterdir()) == []
