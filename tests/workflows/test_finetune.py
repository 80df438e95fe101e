"""``medgn train --init-from``: weights loaded layer by layer, heads re-initialised, encoder freezing,
architecture refusals, and a fine-tuned run that learns faster than one from scratch.

The pretraining task has 3 classes (a bright cube and a bright ball in noise); the fine-tuning task
is its 2-class variant (one "object" class for both) on other cases. The encoder learnt to find
bright blobs, so the fine-tuned run needs fewer steps to a given validation Dice. Everything is
seeded and runs on the CPU, so the step counts are reproducible.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medgn.checkpoint import load_checkpoint
from medgn.cli import main
from medgn.configtools import build
from medgn.models.config import UNet3DConfig
from medgn.models.registry import build_model
from medgn.workflows.finetune import load_init_source, match_weights

TINY = [
    "--set", "model.features=[4,8]", "--set", "plan.patch_size=[16,16,16]", "--set", "plan.n_folds=2",
    "--set", "data.num_workers=0", "--set", "train.amp=off", "--set", "train.optimizer=adamw",
    "--set", "train.lr=0.03", "--set", "train.schedule=constant", "--set", "train.val_every=1",
    "--set", "train.log_every=1", "--set", "train.checkpoint_every_minutes=0", "--no-progress", "--device", "cpu",
]  # fmt: skip
# Validation Dice the runs race to (both at lr 0.003); with these seeds the fine-tuned run (its head
# warm-started from the 3-class head) is at 0.91 after 2 steps, the run from scratch reaches 0.85
# at step 12 (and the fine-tuned one is ahead at every validation before).
TARGET_DICE = 0.85


def make_blobs(root: Path, n: int, merged: bool, seed0: int, size: int = 16) -> Path:
    """MSD dataset: a bright 8^3 cube (1) and a bright ball of radius 4.5 (2) in noise; ``merged``: one class."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    training = []
    for i in range(n):
        rng = np.random.default_rng(seed0 + i)
        label = np.zeros((size,) * 3, np.uint8)
        a = rng.integers(0, 5, 3)
        label[a[0] : a[0] + 8, a[1] : a[1] + 8, a[2] : a[2] + 8] = 1
        centre = rng.integers(6, 11, 3)
        r = np.sqrt(((np.indices(label.shape) - centre[:, None, None, None]) ** 2).sum(0))
        label[(r < 4.5) & (label == 0)] = 2
        image = (np.where(label > 0, 100.0, 50.0) + rng.normal(0, 5, label.shape)).astype(np.float32)
        for folder, arr in (("imagesTr", image), ("labelsTr", (label > 0).astype(np.uint8) if merged else label)):
            img = nib.Nifti1Image(arr, affine)
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            nib.save(img, root / folder / f"c{i}.nii.gz")
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    labels = {"0": "background", "1": "object"} if merged else {"0": "background", "1": "cube", "2": "ball"}
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "blobs",
                "modality": {"0": "MRI"},
                "labels": labels,
                "numTraining": n,
                "training": training,
                "test": [],
            }
        )
    )
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a 3-class run trained for 80 steps, the 2-class fine-tuning dataset)."""
    base = tmp_path_factory.mktemp("finetune")
    pre = make_blobs(base / "data_pre", 6, False, seed0=100)
    run = base / "pretrained"
    assert (
        main(
            [
                "train",
                "--data",
                str(pre),
                "--out",
                str(run),
                *TINY,
                "--set",
                "train.epochs=1",
                "--set",
                "train.iters_per_epoch=80",
                "--set",
                "train.lr=0.01",
            ]
        )
        == 0
    )
    return run, make_blobs(base / "data_ft", 4, True, seed0=0)


def _dice_curve(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["val_mean"]) for r in lines if r.get("kind") == "epoch"]


@pytest.mark.slow
def test_fine_tuning_reaches_the_target_dice_in_fewer_steps(pretrained: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = pretrained
    schedule = ["--set", "train.epochs=8", "--set", "train.iters_per_epoch=2", "--set", "train.lr=0.003"]
    assert (
        main(["train", "--data", str(data), "--out", str(tmp_path / "ft"), *TINY, *schedule, "--init-from", str(run)])
        == 0
    )
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "scratch"), *TINY, *schedule]) == 0
    ft, scratch = _dice_curve(tmp_path / "ft"), _dice_curve(tmp_path / "scratch")

    def first(curve: list[tuple[int, float]]) -> int:
        return next((step for step, dice in curve if dice >= TARGET_DICE), 10**9)

    assert first(ft) < first(scratch) <= 16, (ft, scratch)
    assert all(f >= s for (_, f), (_, s) in zip(ft, scratch) if _ < first(ft)), (ft, scratch)
    report = json.loads((tmp_path / "ft" / "init_report.json").read_text())
    assert report["reinitialised"] == ["heads.0.weight", "heads.0.bias"]
    head = next(r for r in report["layers"] if r["layer"] == "heads.0.weight")
    assert head["reason"] == "classes 3 -> 2" and report["loaded"] == len(report["layers"]) - 2
    assert "heads.0.weight: reinitialised (classes 3 -> 2)" in (tmp_path / "ft" / "medgn.log").read_text()


@pytest.mark.slow
def test_frozen_encoder_keeps_the_loaded_weights(pretrained: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = pretrained
    out = tmp_path / "frozen"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(out),
                *TINY,
                "--set",
                "train.epochs=1",
                "--set",
                "train.iters_per_epoch=2",
                "--init-from",
                str(run),
                "--freeze-encoder-steps",
                "2",
            ]
        )
        == 0
    )
    source = load_init_source(run).weights
    final = load_checkpoint(out / "checkpoints" / "final.json")["model"]
    encoder = [k for k in final if k.startswith("encoder.")]
    assert encoder and all(torch.equal(final[k], source[k]) for k in encoder)
    assert not torch.equal(final["decoder.0.0.conv.weight"], source["decoder.0.0.conv.weight"])  # the rest trained
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["freeze_encoder_steps"] == 2


def test_a_resumed_fine_tune_keeps_its_encoder_frozen_without_the_flag(
    pretrained: tuple[Path, Path], tmp_path: Path
) -> None:
    run, data = pretrained
    out = tmp_path / "frozen"
    argv = ["train", "--data", str(data), "--out", str(out), *TINY, "--set", "train.iters_per_epoch=2"]
    assert main([*argv, "--set", "train.epochs=1", "--init-from", str(run), "--freeze-encoder-steps", "4"]) == 0
    assert main([*argv, "--set", "train.epochs=2", "--resume"]) == 0  # steps 3 and 4: still frozen
    source = load_init_source(run).weights
    final = load_checkpoint(out / "checkpoints" / "final.json")
    assert final["counters"]["iteration"] == 4
    encoder = [k for k in final["model"] if k.startswith("encoder.")]
    assert encoder and all(torch.equal(final["model"][k], source[k]) for k in encoder)


def test_other_architecture_is_refused_with_the_shapes_and_nothing_written(
    pretrained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, data = pretrained
    out = tmp_path / "wide"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(out),
                *TINY,
                "--set",
                "model.features=[8,16]",
                "--init-from",
                str(run),
            ]
        )
        == 4
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "another architecture" in err[0]
        and "encoder.0.0.conv.weight: source (4, 1, 3, 3, 3), target (8, 1, 3, 3, 3)" in err[0]
    )
    assert not out.exists()
    # into a folder the user made: it keeps what it held, and nothing of the refused run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    argv = ["train", "--data", str(data), "--out", str(mine), *TINY, "--set", "model.features=[8,16]"]
    assert main([*argv, "--init-from", str(run)]) == 4
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_shallower_config_is_refused_naming_both_depths(
    pretrained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, data = pretrained
    deep = tmp_path / "deep"  # a 3-stage source, trained for two steps
    steps = ["--set", "train.epochs=1", "--set", "train.iters_per_epoch=2"]
    assert (
        main(["train", "--data", str(data), "--out", str(deep), *TINY, "--set", "model.features=[4,8,16]", *steps]) == 0
    )
    capsys.readouterr()
    out = tmp_path / "shallow"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY, "--init-from", str(deep)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the source model has 3 stages, the config's model.features gives 2" in err[0], err
    assert str(deep) in err[0] and not out.exists()


def test_first_conv_is_reinitialised_for_another_channel_count(pretrained: tuple[Path, Path]) -> None:
    run, _ = pretrained
    source = load_init_source(run)
    net = build_model(
        build(UNet3DConfig, {"features": [4, 8]}, "model"),
        2,
        2,
        source.plan["network"]["strides"],
        source.plan["network"]["kernel_sizes"],
    )
    load, rows = match_weights(net, source)
    actions = {r["layer"]: r.get("reason", r["action"]) for r in rows}
    assert (
        actions["encoder.0.0.conv.weight"] == "input channels 1 -> 2" and actions["heads.0.weight"] == "classes 3 -> 2"
    )
    assert "encoder.0.0.conv.weight" not in load and torch.equal(
        load["encoder.0.1.conv.weight"], source.weights["encoder.0.1.conv.weight"]
    )


def test_the_first_conv_follows_channels_named_in_another_order() -> None:
    # Fine-tuning a FLAIR, T1c model on a dataset declaring T1c, FLAIR applied each filter's FLAIR
    # weights to T1c, without a word (init_report said every layer was loaded as it was).
    from medgn.workflows.finetune import FIRST_CONV, InitSource

    strides, kernels = [[1, 1, 1], [2, 2, 2]], [[3, 3, 3], [3, 3, 3]]
    cfg = build(UNet3DConfig, {"features": [4, 8]}, "model")
    torch.manual_seed(0)
    trained = build_model(cfg, 2, 2, strides, kernels)
    plan = {"network": {"strides": strides}, "dataset": {"channel_names": ["FLAIR", "T1c"]}}
    source = InitSource(Path("src.pt"), "0" * 64, trained.state_dict(), {}, plan)
    net = build_model(cfg, 2, 2, strides, kernels)
    load, rows = match_weights(net, source, ("T1c", "FLAIR"))
    first = source.weights[FIRST_CONV]
    assert torch.equal(load[FIRST_CONV][:, 0], first[:, 1]) and torch.equal(load[FIRST_CONV][:, 1], first[:, 0])
    row = next(r for r in rows if r["layer"] == FIRST_CONV)
    assert row["action"] == "loaded" and row["reason"] == "input channels reordered: FLAIR, T1c -> T1c, FLAIR"
    for same in (("FLAIR", "T1c"), ("t1", "t2"), ()):  # the same order, other names, no names: as they are
        assert torch.equal(match_weights(net, source, same)[0][FIRST_CONV], first)
