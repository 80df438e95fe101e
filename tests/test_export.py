"""``medgn export``: ONNX (onnxruntime) and TorchScript match PyTorch; refusals write nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from medgn.checkpoint import save_checkpoint
from medgn.cli import main
from medgn.configtools import build
from medgn.export import export_module, run_exported
from medgn.models.config import UNet3DConfig
from medgn.models.registry import build_model

onnx = pytest.importorskip("onnx", reason="medgn export needs the 'export' extra (onnx, onnxruntime)")
pytest.importorskip("onnxruntime", reason="medgn export needs the 'export' extra (onnx, onnxruntime)")

# float32 onnxruntime / TorchScript vs PyTorch eager: the same maths with sums reassociated inside
# convolutions and normalisations, ~1e-6 relative per layer over ~10 layers; 1e-4 (absolute, on
# logits of order 1) is 10-100x that and far below any error a wrong graph would make.
ATOL, RTOL = 1e-4, 1e-4
STRIDES = [[1, 1, 1], [2, 2, 2], [2, 2, 2]]  # total stride 4: valid sizes are multiples of 4
PLAN = {
    "version": 1, "in_channels": 1, "num_classes": 3, "label_values": [0, 1, 2], "target_spacing": [1.0, 1.0, 1.0],
    "normalization": [{"scheme": "zscore"}], "patch_size": [16, 16, 16], "batch_size": 1,
    "network": {"strides": STRIDES, "kernel_sizes": [[3, 3, 3]] * 3},
}  # fmt: skip
CONFIG = {"model": {"features": [8, 16, 32], "num_groups": 4, "deep_supervision": True}}


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = build_model(build(UNet3DConfig, CONFIG["model"], "model"), 1, 3, STRIDES, PLAN["network"]["kernel_sizes"])
    with torch.no_grad():  # non-trivial norm affine so a dropped GroupNorm weight/bias would show
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    state = {
        "model": {k: v.clone() for k, v in _model().state_dict().items()},
        "config": CONFIG,
        "plan": PLAN,
        "counters": {"epoch": 1, "iteration": 1},
    }
    save_checkpoint(state, run / "checkpoints", tag="epoch", pointers=("latest", "best"))
    return run


def _pytorch(x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = _model()(torch.from_numpy(x))
    return (out[0] if isinstance(out, (list, tuple)) else out).numpy()


def _la2018_window(shared: Path, size: tuple[int, int, int]) -> np.ndarray:
    """A window of a real LA2018 MRI, z-scored over its nonzero voxels as the plan's pipeline does."""
    from medgn.data.io import read_volume

    image = sorted((shared / "LA2018" / "imagesTr").glob("*.nii.gz"))[0]
    vol = read_volume(image).array
    c = [s // 2 for s in vol.shape]
    window = vol[tuple(slice(ci - si // 2, ci - si // 2 + si) for ci, si in zip(c, size))].astype(np.float64)
    nz = window[window != 0]
    return ((window - nz.mean()) / nz.std()).astype(np.float32)[None, None]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_on_random_inputs_of_several_sizes(fmt: str, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / f"model.{fmt}"
    assert main(["export", "--model", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    rng = np.random.default_rng(1)
    for shape in [(1, 1, 16, 16, 16), (2, 1, 8, 12, 20), (1, 1, 24, 16, 8)]:  # dynamic batch and spatial size
        x = rng.normal(size=shape).astype(np.float32)
        got = run_exported(out, fmt, x)
        assert got.shape == (shape[0], 3, *shape[2:])
        np.testing.assert_allclose(got, _pytorch(x), atol=ATOL, rtol=RTOL)


@pytest.mark.data
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_on_a_real_scan_window(
    fmt: str, run_dir: Path, tmp_path: Path, shared_data: Path
) -> None:
    out = tmp_path / f"model.{fmt}"
    assert main(["export", "--model", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    x = _la2018_window(shared_data, (48, 48, 32))
    np.testing.assert_allclose(run_exported(out, fmt, x), _pytorch(x), atol=ATOL, rtol=RTOL)


def test_onnx_graph_uses_standard_ops_only(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    assert main(["export", "--model", str(run_dir), "--out", str(out)]) == 0
    graph = onnx.load(str(out))
    onnx.checker.check_model(graph)
    domains = {n.domain for n in graph.graph.node}
    ops = {n.op_type for n in graph.graph.node}
    assert domains <= {"", "ai.onnx"} and "InstanceNormalization" in ops  # GroupNorm as its decomposition
    assert graph.graph.input[0].type.tensor_type.shape.dim[2].dim_param == "depth"


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_model_that_infers_channels_last_exports(fmt: str, tmp_path: Path) -> None:
    """Runs of the CPU recipe infer in channels_last_3d (their config's infer.memory_format)."""
    run = tmp_path / "run"
    state = {
        "model": {k: v.clone() for k, v in _model().state_dict().items()},
        "config": {**CONFIG, "infer": {"memory_format": "channels_last_3d"}},
        "plan": PLAN,
        "counters": {"epoch": 1, "iteration": 1},
    }
    save_checkpoint(state, run / "checkpoints", tag="epoch", pointers=("latest", "best"))
    out = tmp_path / f"model.{fmt}"
    assert main(["export", "--model", str(run), "--format", fmt, "--out", str(out)]) == 0
    x = np.random.default_rng(2).normal(size=(1, 1, 16, 12, 20)).astype(np.float32)
    np.testing.assert_allclose(run_exported(out, fmt, x), _pytorch(x), atol=ATOL, rtol=RTOL)


def test_output_in_a_missing_folder_or_onto_a_folder_is_a_usage_error(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a_folder.onnx").mkdir()
    for out, words in [
        (tmp_path / "missing" / "m.onnx", "output folder does not exist"),
        (tmp_path / "a_folder.onnx", "is a folder"),
    ]:
        assert main(["export", "--model", str(run_dir), "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and str(out) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder.onnx"]


def test_existing_file_without_overwrite_is_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"keep me")
    assert main(["export", "--model", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output file exists" in err[0] and "--overwrite" in err[0]
    assert out.read_bytes() == b"keep me"
    assert main(["export", "--model", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:7] != b"keep me"


class _Unsupported(nn.Module):
    """A network with an operator ONNX cannot express (an eigen decomposition)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean() * torch.eye(2) + torch.ones(2, 2)
        return x * torch.linalg.eigvals(m).real.sum()


def test_unsupported_operator_is_a_one_line_error_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.onnx"
    with pytest.raises(Exception) as info:
        export_module(_Unsupported(), 1, out, example_size=(4, 4, 4))
    assert getattr(info.value, "code", None) == 4 and "unsupported operator" in str(info.value)
    assert not out.exists() and not list(tmp_path.glob(".medgn-tmp-*"))
    # Through the CLI: the checkpoint's network is built with the unsupported op inside.
    import medgn.infer.predictor as predictor_module

    real_build = predictor_module._load_one

    def with_bad_op(*args: Any, **kwargs: Any) -> Any:
        model, plan, source, config, defaults = real_build(*args, **kwargs)
        return nn.Sequential(model, _Unsupported()), plan, source, config, defaults

    monkeypatch.setattr(predictor_module, "_load_one", with_bad_op)
    assert main(["export", "--model", str(run_dir), "--out", str(out)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot export to onnx: unsupported operator" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".medgn-tmp-*"))


@pytest.mark.parametrize(
    ("name", "fmt", "extra"),
    [
        ("m.onnx", "onnx", []),
        ("m.pt", "torchscript", []),
        ("m.TS", "torchscript", []),
        ("m.json", "onnx", ["--format", "onnx"]),
    ],
)
def test_the_format_follows_the_file_name_and_the_file_carries_the_preprocessing(
    name: str, fmt: str, extra: list[str], run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from medgn.export import exported_metadata

    out = tmp_path / name
    assert main(["export", "--model", str(run_dir), "--out", str(out), *extra]) == 0  # any name with --format
    printed = capsys.readouterr().out
    assert f"exported {fmt} model -> {out}" in printed and "multiples of (4, 4, 4)" in printed, printed
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 12, 16)).astype(np.float32)
    np.testing.assert_allclose(run_exported(out, fmt, x), _pytorch(x), atol=ATOL, rtol=RTOL)  # loads as that format
    meta = exported_metadata(out, fmt)
    assert meta["medgn_stride"] == "4,4,4"
    pre = json.loads(meta["medgn_preprocessing"])
    assert pre["target_spacing"] == PLAN["target_spacing"] and pre["label_values"] == PLAN["label_values"]
    assert pre["normalization"] == PLAN["normalization"] and pre["in_channels"] == 1
    # The steps before the network, which the plan's numbers alone do not say (crop, RAS, nonzero z-score).
    steps = " ".join(pre["steps"])
    assert "crop to the box of voxels nonzero" in steps and "reorient to RAS" in steps and "nonzero voxels" in steps
    assert pre["pipeline_version"] >= 3


@pytest.mark.parametrize(
    ("name", "extra", "words"),
    [
        ("m.pt", ["--format", "onnx"], "the file name says torchscript, but --format is onnx"),
        ("m.onnx", ["--format", "torchscript"], "the file name says onnx, but --format is torchscript"),
        ("m.bin", [], "cannot tell the export format from the file name"),
    ],
)
def test_a_name_and_format_that_disagree_are_refused_before_loading(
    name: str, extra: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / name
    assert main(["export", "--model", str(tmp_path / "no-model"), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and str(out) in err[0], err
    assert not out.exists()


def test_a_folder_of_fold_runs_is_refused_naming_one_of_them(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    ensemble = tmp_path / "ensemble"
    for k in range(2):
        shutil.copytree(run_dir, ensemble / f"fold_{k}")
    out = tmp_path / "model.onnx"
    assert main(["export", "--model", str(ensemble), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ensemble of 2" in err[0] and "fold_0" in err[0]
    assert not out.exists()
    assert main(["export", "--model", str(ensemble / "fold_0"), "--out", str(out)]) == 0
