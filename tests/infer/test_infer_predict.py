"""Sliding-window prediction (stitching, TTA, ensembles, OOM fallback) and checkpoint loading."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import _infer_fixtures as F
import numpy as np
import pytest
import torch
from torch import nn

from medgn.errors import ModelError, ResourceError, UsageError
from medgn.infer.predictor import Predictor, load_predictor
from medgn.infer.sliding_window import WindowSettings, mirror_flips, predict_probabilities


def _conv_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv3d(1, 3, 3, padding=1).eval()  # random weights are not flip-symmetric: TTA matters


def _reference(models: list[nn.Module], x: torch.Tensor, flips: list[tuple[int, ...]]) -> torch.Tensor:
    """Mean softmax over flips and models of whole-volume forwards, in float64."""
    total = torch.zeros((3, *x.shape[1:]), dtype=torch.float64)
    for m in models:
        m64 = _double(m)
        for dims in flips:
            xb = x.double()[None]
            out = m64(torch.flip(xb, dims) if dims else xb)
            p = torch.softmax(out, 1)
            total += (torch.flip(p, dims) if dims else p)[0]
    return total / (len(models) * len(flips))


def _double(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m).double()


@pytest.mark.parametrize("axes,count", [((0, 1, 2), 8), ((0, 2), 4), ((1,), 2)])
def test_mirror_flips_cover_every_subset(axes: tuple[int, ...], count: int) -> None:
    flips = mirror_flips(WindowSettings((8, 8, 8), tta=True, mirror_axes=axes))
    assert len(flips) == count == len(set(flips))
    assert all(all(d - 2 in axes for d in f) for f in flips)
    assert mirror_flips(WindowSettings((8, 8, 8), tta=False)) == [()]


@pytest.mark.parametrize("tta", [False, True])
def test_tta_and_ensemble_match_float64_reference(tta: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 6, 5, 7)
    models = [_conv_net(1), _conv_net(2)]
    # One window covering the volume: the Gaussian weights divide out exactly.
    settings = WindowSettings((6, 5, 7), overlap=0.0, tta=tta)
    got = predict_probabilities(models, x, settings)
    want = _reference(models, x, mirror_flips(settings))
    assert got.shape == (3, 6, 5, 7)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=0)  # float32 softmax error


def test_gaussian_stitching_of_a_pointwise_model_is_exact() -> None:
    x = torch.as_tensor(F.image())[None] / 50.0 - 0.5
    net = F.ThresholdNet()
    got = predict_probabilities([net], x, WindowSettings((8, 8, 8), overlap=0.5, sw_batch_size=3))
    want = torch.softmax(net(x.double()[None]), 1)[0]
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)


class _FailingOnce(nn.Module):
    def __init__(self, error: type[BaseException]) -> None:
        super().__init__()
        self.inner = F.ThresholdNet()
        self.error = error
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def test_out_of_memory_falls_back_to_cpu_stitching_and_is_recorded() -> None:
    x = torch.as_tensor(F.image())[None] - 50.0
    warnings: list[str] = []
    model = _FailingOnce(torch.OutOfMemoryError)
    got = predict_probabilities([model], x, WindowSettings((8, 8, 8)), warnings=warnings)
    want = predict_probabilities([F.ThresholdNet()], x, WindowSettings((8, 8, 8)))
    assert torch.equal(got, want)
    assert len(warnings) == 1 and "stitching moved to the CPU" in warnings[0]


def test_the_retry_starts_after_the_failed_attempt_let_go_of_its_memory() -> None:
    """The retry ran inside the ``except`` block: the live exception kept the failed attempt's frames,
    and with them its GPU buffers, so ``empty_cache`` freed nothing and the retry had no room."""
    import weakref

    held: list[weakref.ref] = []

    class HoldsThenFails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = F.ThresholdNet()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not held:
                activations = torch.ones(64, 64, 64)  # what a failed forward holds when memory runs out
                held.append(weakref.ref(activations))
                raise torch.OutOfMemoryError("CUDA out of memory")
            assert held[0]() is None, "the failed attempt's tensors are still alive during the retry"
            return self.inner(x)

    x = torch.as_tensor(F.image())[None] - 50.0
    got = predict_probabilities([HoldsThenFails()], x, WindowSettings((8, 8, 8)), warnings=[])
    assert torch.equal(got, predict_probabilities([F.ThresholdNet()], x, WindowSettings((8, 8, 8))))


def test_other_errors_are_not_swallowed() -> None:
    x = torch.zeros(1, 12, 12, 12)
    warnings: list[str] = []
    with pytest.raises(RuntimeError, match="out of memory") as info:
        predict_probabilities([_FailingOnce(RuntimeError)], x, WindowSettings((8, 8, 8)), warnings=warnings)
    assert not isinstance(info.value, torch.OutOfMemoryError)
    assert warnings == []


def test_out_of_memory_twice_is_a_resource_error() -> None:
    class AlwaysOOM(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(ResourceError) as info:
        predict_probabilities([AlwaysOOM()], torch.zeros(1, 8, 8, 8), WindowSettings((8, 8, 8)))
    assert info.value.code == 5


def test_the_cpu_allocator_running_out_is_a_resource_error() -> None:
    """The CPU allocator raises a plain RuntimeError; a window too large for RAM is exit 5, not a bug."""

    class CannotAllocate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(ResourceError, match="out of memory") as info:
        predict_probabilities([CannotAllocate()], torch.zeros(1, 8, 8, 8), WindowSettings((8, 8, 8)))
    assert info.value.code == 5 and "can't allocate memory" in str(info.value)


# ---------------------------------------------------------------- checkpoints


def test_run_folder_resolves_best_and_records_sha256(tmp_path: Path) -> None:
    from medgn.checkpoint import file_sha256, read_pointer, save_checkpoint

    run = F.save_run(tmp_path / "run", seed=0)
    best = read_pointer(run / "checkpoints", "best")
    state = torch.load(run / "checkpoints" / best["file"], weights_only=True)
    state["counters"] = {"epoch": 2, "iteration": 2}
    for k in ("format", "format_version"):
        state.pop(k)
    save_checkpoint(state, run / "checkpoints", tag="step", pointers=("latest",))  # newer, not best
    predictor = load_predictor(run)
    assert Path(predictor.sources[0].path).name == best["file"]
    assert predictor.sources[0].sha256 == file_sha256(run / "checkpoints" / best["file"]) == best["sha256"]
    assert not predictor.models[0].training
    assert predictor.label_values == [0, 1]


def _bad_file(tmp_path: Path, kind: str) -> Path:
    run = F.save_run(tmp_path / "run")
    from medgn.checkpoint import read_pointer

    ckpt = run / "checkpoints" / read_pointer(run / "checkpoints", "best")["file"]
    (ckpt.parent / (ckpt.name + ".sha256")).unlink()  # test the loader, not the hash check
    state = torch.load(ckpt, weights_only=True)
    if kind == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:300])
    elif kind == "code":

        class Evil:
            def __reduce__(self) -> tuple:
                return (os.system, (f"touch {tmp_path / 'pwned'}",))

        ckpt.write_bytes(pickle.dumps({"format": "medgn-checkpoint", "model": Evil()}))
    elif kind == "missing_plan":
        state.pop("plan")
        torch.save(state, ckpt)
    elif kind == "classes":
        state["plan"] = {**state["plan"], "num_classes": 3, "label_values": [0, 1, 2]}
        torch.save(state, ckpt)
    elif kind == "nan":
        key = next(k for k, v in state["model"].items() if v.is_floating_point())
        state["model"][key] = torch.full_like(state["model"][key], float("nan"))
        torch.save(state, ckpt)
    return ckpt


@pytest.mark.parametrize(
    "kind,words",
    [
        ("truncated", "cannot load"),
        ("code", "cannot load"),
        ("missing_plan", "missing keys: plan"),
        ("classes", "expected (3,"),
        ("nan", "non-finite"),
    ],
)
def test_bad_checkpoints_are_model_errors_naming_the_file(tmp_path: Path, kind: str, words: str) -> None:
    ckpt = _bad_file(tmp_path, kind)
    with pytest.raises(ModelError) as info:
        load_predictor(ckpt)
    assert info.value.code == 4
    assert str(ckpt) in info.value.one_line() and words in info.value.one_line()
    assert not (tmp_path / "pwned").exists()


def test_missing_model_and_empty_run_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model not found"):
        load_predictor(tmp_path / "nope")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ModelError, match="no checkpoint"):
        load_predictor(tmp_path / "empty")


def test_ensemble_requires_agreeing_plans(tmp_path: Path) -> None:
    a = F.save_run(tmp_path / "a", seed=0)
    b = F.save_run(tmp_path / "b", seed=1)
    both = load_predictor([a, b])
    assert len(both.models) == 2 and len(set(both.model_sha256s)) == 2
    c = F.save_run(tmp_path / "c", plan_dict=F.plan(target_spacing=[1.0, 1.0, 2.0]))
    with pytest.raises(ModelError, match="target_spacing") as info:
        load_predictor([a, c])
    assert info.value.code == 4


def test_a_folder_of_run_folders_is_the_ensemble_of_all_of_them(tmp_path: Path) -> None:
    cv = tmp_path / "cv"
    runs = [F.save_run(cv / f"fold_{k}", seed=k) for k in range(3)]
    (cv / "cv_summary.json").write_text("{}")  # a user's own notes beside the folds change nothing
    (cv / "notes").mkdir()  # nor does a folder without checkpoints
    both = load_predictor(cv)
    assert [Path(s.path).parents[1].name for s in both.sources] == ["fold_0", "fold_1", "fold_2"]
    assert both.model_sha256s == load_predictor(runs).model_sha256s
    assert len(load_predictor(cv / "fold_1").models) == 1  # a run folder is one model


def test_injected_modules_get_a_weight_hash() -> None:
    p1 = Predictor.from_modules([F.ThresholdNet(0.0)], F.plan())
    p2 = Predictor.from_modules([F.ThresholdNet(1.0)], F.plan())
    assert p1.model_sha256s != p2.model_sha256s
    assert p1.model_sha256s == Predictor.from_modules([F.ThresholdNet(0.0)], F.plan()).model_sha256s


def test_bf16_precision_on_cpu_stays_close_to_fp32() -> None:
    # bf16 autocast keeps 8 bits of mantissa: probabilities move by ~1e-2 at most on a small net,
    # and the argmax agrees on nearly every voxel.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 3, 1)).eval()
    image = torch.randn(1, 20, 18, 16)
    fp32 = predict_probabilities([net], image, WindowSettings(roi_size=(16, 16, 16), precision="fp32"))
    bf16 = predict_probabilities([net], image, WindowSettings(roi_size=(16, 16, 16), precision="bf16"))
    assert not torch.equal(fp32, bf16)  # bf16 really ran
    assert (fp32 - bf16).abs().max() < 5e-2
    assert (fp32.argmax(0) == bf16.argmax(0)).float().mean() > 0.97
    with pytest.raises(UsageError, match="precision"):
        WindowSettings(roi_size=(16, 16, 16), precision="fp8")


def test_auto_precision_is_recorded_as_what_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from medgn.infer.sliding_window import resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setenv("MEDGN_CPU_BF16", "1")
    assert resolve_precision(cpu, "auto") == "bf16"
    monkeypatch.setenv("MEDGN_CPU_BF16", "0")
    assert resolve_precision(cpu, "auto") == "fp32"
    assert resolve_precision(cpu, "bf16") == "bf16" and resolve_precision(cpu, "fp32") == "fp32"


@pytest.mark.parametrize("k", [1, 2, 5, 300])
def test_class_indices_match_argmax_with_ties(k: int) -> None:
    from medgn.infer.case import class_indices

    g = torch.Generator().manual_seed(k)
    # Scores on a coarse grid of values, so many voxels tie between classes.
    probs = torch.randint(0, 4, (k, 9, 7, 5), generator=g).float() / 4
    got = class_indices(probs)
    assert got.dtype == (np.uint8 if k <= 256 else np.int64) and got.shape == (9, 7, 5)
    np.testing.assert_array_equal(got.astype(np.int64), probs.argmax(dim=0).numpy())


def test_class_indices_never_pick_a_nan_score() -> None:
    from medgn.infer.case import class_indices

    probs = torch.tensor([[0.2, float("nan"), 0.7], [float("nan"), 0.9, 0.3], [0.1, 0.1, float("nan")]])[
        ..., None, None
    ]
    assert class_indices(probs).ravel().tolist() == [0, 1, 0]


@pytest.mark.parametrize(
    ("capability", "expected"), [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]
)
def test_a_gpu_without_native_bf16_gets_fp16_with_a_scaler(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], expected: str
) -> None:
    """torch.cuda.is_bf16_supported() counts emulation (True on a V100 or T4): "auto" chose slow bf16 there,
    and asked the current device, not the one the run uses."""
    from medgn.environment import cuda_bf16_supported
    from medgn.infer.sliding_window import autocast_for, resolve_precision
    from medgn.train.optim import resolve_amp

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what torch says everywhere
    asked: list[object] = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: asked.append(index) or capability)
    gpu = torch.device("cuda", 1)
    assert cuda_bf16_supported(gpu) is (expected == "bf16") and asked == [1]
    assert resolve_precision(gpu, "auto") == expected
    amp = resolve_amp("auto", gpu)
    assert amp == ((torch.bfloat16, False) if expected == "bf16" else (torch.float16, True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a build without CUDA may say so
        context = autocast_for(gpu, "auto")
    assert context.fast_dtype == (torch.bfloat16 if expected == "bf16" else torch.float16)
