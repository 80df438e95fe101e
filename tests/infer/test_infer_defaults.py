"""Inference defaults a model carries (the run config's ``infer`` section) and their overrides.

A recipe that trains for mirroring test-time augmentation records it in its checkpoints;
``medgn infer`` with default settings uses it, ``--tta``/``--no-tta``/``--mirror-axes`` override it,
ensembles merge it, and a checkpoint from before the section existed keeps TTA off.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _infer_fixtures as F
import numpy as np
import pytest
import torch

from medgn.cli import main
from medgn.commands.infer import _axes
from medgn.config import build_run_config
from medgn.errors import ModelError, UsageError
from medgn.infer.config import InferConfig
from medgn.infer.predictor import load_predictor, merge_infer_defaults


def _scan(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    F.write_image(root / "a.nii.gz", F.image(), F.axis_affines()[0])
    return root


def _window(out: Path) -> dict:
    return json.loads((out / "a.json").read_text())["settings"]


def test_merge_infer_defaults() -> None:
    off, all3, inplane = InferConfig(), InferConfig(True, (0, 1, 2)), InferConfig(True, (1, 0))
    assert merge_infer_defaults([off, off]) == InferConfig()
    assert merge_infer_defaults([off, inplane]) == InferConfig(True, (1, 0))  # any model asking turns it on
    assert merge_infer_defaults([all3, inplane]) == InferConfig(True, (0, 1))  # axes every asker mirrors
    assert merge_infer_defaults([InferConfig(True, (2,)), inplane]) == InferConfig()  # nothing in common


def test_config_section_is_validated() -> None:
    cfg = build_run_config({"infer": {"tta": True, "mirror_axes": [0, 1]}})
    assert cfg.infer == InferConfig(True, (0, 1)) and cfg.to_dict()["infer"] == {
        "tta": True,
        "mirror_axes": [0, 1],
        "memory_format": None,
    }
    for bad, key in (
        ({"mirror_axes": [0, 0]}, "distinct"),
        ({"mirror_axes": [3]}, "out of range"),
        ({"tt": 1}, "infer.tt"),
    ):
        with pytest.raises(UsageError) as err:
            build_run_config({"infer": bad})
        assert "infer" in err.value.one_line() and key in err.value.one_line()


def test_the_model_default_and_the_command_line_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = F.save_run(tmp_path / "run", infer={"tta": True, "mirror_axes": [0, 1]})
    src = _scan(tmp_path / "in")
    base = ["infer", "--model", str(run), "--input", str(src), "--no-progress", "--output"]
    assert main([*base, str(tmp_path / "default")]) == 0
    assert (_window(tmp_path / "default")["tta"], _window(tmp_path / "default")["mirror_axes"]) == (True, [0, 1])
    assert main([*base, str(tmp_path / "off"), "--no-tta"]) == 0
    assert _window(tmp_path / "off")["tta"] is False
    assert main([*base, str(tmp_path / "z"), "--mirror-axes", "2"]) == 0
    assert (_window(tmp_path / "z")["tta"], _window(tmp_path / "z")["mirror_axes"]) == (True, [2])
    # Two flips and one pass of the same untrained network give different probabilities: the
    # recorded settings are the ones that ran.
    assert main([*base, str(tmp_path / "zp"), "--mirror-axes", "2", "--save-probabilities"]) == 0
    assert main([*base, str(tmp_path / "offp"), "--no-tta", "--save-probabilities"]) == 0
    with np.load(tmp_path / "zp" / "a_probabilities.npz") as a, np.load(tmp_path / "offp" / "a_probabilities.npz") as b:
        assert not np.array_equal(a["probabilities"], b["probabilities"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as bad:
        main([*base, str(tmp_path / "bad"), "--mirror-axes", "0,3"])
    assert bad.value.code == 2 and "--mirror-axes" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_old_checkpoints_keep_tta_off_and_bad_sections_are_model_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = F.save_run(tmp_path / "old")
    assert load_predictor(old).defaults == InferConfig()
    src = _scan(tmp_path / "in")
    assert (
        main(["infer", "--model", str(old), "--input", str(src), "--output", str(tmp_path / "o"), "--no-progress"]) == 0
    )
    assert _window(tmp_path / "o")["tta"] is False
    # Axes without --tta ask for mirroring; the axes are recorded sorted.
    args = ["infer", "--model", str(old), "--input", str(src), "--no-progress", "--mirror-axes", "1,0"]
    assert main([*args, "--output", str(tmp_path / "ax")]) == 0
    assert (_window(tmp_path / "ax")["tta"], _window(tmp_path / "ax")["mirror_axes"]) == (True, [0, 1])
    # --no-tta wins over axes, and a run without mirroring records every axis, as before.
    assert main([*args, "--no-tta", "--output", str(tmp_path / "ax_off")]) == 0
    assert (_window(tmp_path / "ax_off")["tta"], _window(tmp_path / "ax_off")["mirror_axes"]) == (False, [0, 1, 2])
    broken = F.save_run(tmp_path / "broken", infer={"mirror_axes": [5]})
    capsys.readouterr()
    code = main(
        ["infer", "--model", str(broken), "--input", str(src), "--output", str(tmp_path / "b"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 4 and "infer.mirror_axes" in err and "broken" in err
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").glob("*.nii.gz"))


def test_the_inference_layout_comes_from_the_infer_section_and_keeps_the_masks(tmp_path: Path) -> None:
    # The tiny model trains contiguous; infer.memory_format runs the same weights channels-last.
    flat = F.save_run(tmp_path / "flat", infer={"tta": False})
    last = F.save_run(tmp_path / "last", infer={"tta": False, "memory_format": "channels_last_3d"})
    models = {name: load_predictor(run).models[0] for name, run in (("flat", flat), ("last", last))}
    assert models["flat"].memory_format == "contiguous" and models["last"].memory_format == "channels_last_3d"
    conv = next(m for m in models["last"].modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d) and not conv.weight.is_contiguous()
    src = _scan(tmp_path / "in")
    for name, run in (("flat", flat), ("last", last)):
        args = ["infer", "--model", str(run), "--input", str(src), "--output", str(tmp_path / f"o_{name}")]
        assert main([*args, "--no-progress", "--save-probabilities"]) == 0
    with (
        np.load(tmp_path / "o_flat" / "a_probabilities.npz") as a,
        np.load(tmp_path / "o_last" / "a_probabilities.npz") as b,
    ):
        np.testing.assert_allclose(
            a["probabilities"].astype(np.float32), b["probabilities"].astype(np.float32), atol=2e-3
        )
    bad = F.save_run(tmp_path / "bad", infer={"memory_format": "nhwc"})
    with pytest.raises(ModelError) as err:
        load_predictor(bad)
    assert "infer.memory_format" in err.value.one_line() and "bad" in err.value.one_line()


@pytest.mark.parametrize(("text", "axes"), [("0,1", (0, 1)), (" 2 , 0 ", (2, 0)), ("1", (1,)), ("0,1,2,", (0, 1, 2))])
def test_mirror_axes_option_parses_distinct_spatial_axes(text: str, axes: tuple[int, ...]) -> None:
    assert _axes(text) == axes


@pytest.mark.parametrize("text", ["", ",", "0,0", "3", "-1", "1.5", "x", "0;1"])
def test_mirror_axes_option_rejects_anything_else(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="distinct axes"):
        _axes(text)
