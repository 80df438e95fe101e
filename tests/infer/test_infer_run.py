"""Folder runs of ``infer`` / ``medgn infer``: kill -9 and rerun, lock, bad cases, skip/overwrite,
refusals before model loading, unsafe names, probabilities, largest component, OOM recording."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import _infer_fixtures as F
import numpy as np
import pytest
import torch

from medgn.cli import main
from medgn.errors import UsageError
from medgn.files import TEMP_MARK
from medgn.infer.predictor import Predictor
from medgn.infer.run import infer
from medgn.planning.plan import Plan

DRIVER = Path(__file__).with_name("_infer_kill_driver.py")
REPO = Path(__file__).resolve().parents[2]
AFFINE = F.axis_affines()[0]


def _folder(root: Path, names: list[str], seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        F.write_image(root / f"{name}.nii.gz", F.image(seed + i), AFFINE)
    return root


def _threshold_predictor(threshold: float = 0.0) -> Predictor:
    return Predictor.from_modules([F.ThresholdNet(threshold)], F.plan())


def _wait_for(predicate, what: str, child: subprocess.Popen, deadline_s: float = 120.0) -> None:
    end = time.monotonic() + deadline_s  # a deadline for a hung child, not a timing assertion
    while not predicate():
        if child.poll() is not None:
            raise AssertionError(
                f"child exited with {child.returncode} before {what}: {child.stderr.read().decode()[-2000:]}"
            )
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    return {p.name: np.asanyarray(nib.load(p).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def test_kill_9_mid_write_then_rerun_skips_done_cases_and_matches(tmp_path: Path) -> None:
    src = _folder(tmp_path / "in", ["c0", "c1", "c2"])
    run = F.save_run(tmp_path / "run")
    out, ref_out = tmp_path / "out", tmp_path / "ref"
    args = ["infer", "--model", str(run), "--input", str(src), "--no-progress"]
    env = {**os.environ, "HANG_AT": "2", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, str(DRIVER), *args, "--output", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(lambda: (out / "c0.json").is_file(), "the first case's sidecar", child)
        _wait_for(
            lambda: any(p.name.startswith(TEMP_MARK) and "c1" in p.name for p in out.iterdir()),
            "the second case's temp file",
            child,
        )
        # A second run on the same folder while the first holds it: refused with code 6.
        assert main([*args, "--output", str(out)]) == 6
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not (out / "c1.nii.gz").exists()
    assert json.loads((out / "c1.json").read_text())["status"] == "running"  # not a proof of completion
    torch.set_num_threads(1)
    assert main([*args, "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [(c["case_id"], c["status"]) for c in report["cases"]] == [("c0", "skipped"), ("c1", "ok"), ("c2", "ok")]
    assert not [p for p in out.iterdir() if p.name.startswith(TEMP_MARK)]
    assert main([*args, "--output", str(ref_out)]) == 0
    got, want = _arrays(out), _arrays(ref_out)
    assert list(got) == ["c0.nii.gz", "c1.nii.gz", "c2.nii.gz"] == list(want)
    for name in want:
        assert (out / name).read_bytes() == (ref_out / name).read_bytes() or np.array_equal(got[name], want[name])
        assert got[name].dtype == np.uint8


def test_bad_case_is_recorded_and_others_succeed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _folder(tmp_path / "in", ["a", "c"])
    (src / "b.nii.gz").write_bytes(b"not a nifti at all")
    report = infer(_threshold_predictor(), src, tmp_path / "out")
    status = {c.case_id: (c.status, c.code) for c in report.cases}
    assert status == {"a": ("ok", None), "b": ("failed", 3), "c": ("ok", None)}
    assert report.exit_code == 3
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["counts"] == {"ok": 2, "skipped": 0, "failed": 1}
    assert "b.nii.gz" in saved["cases"][1]["message"]
    assert np.array_equal(_arrays(tmp_path / "out")["a.nii.gz"] == 1, F.blob())


def test_refusals_happen_before_the_model_is_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _folder(tmp_path / "in", ["a"])
    missing_model = str(tmp_path / "no-such-run")  # loading it would be exit 4
    assert (
        main(["infer", "--model", missing_model, "--input", str(src), "--output", str(src / "out"), "--no-progress"])
        == 2
    )
    assert "inside the input" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert (
        main(["infer", "--model", missing_model, "--input", str(src), "--output", str(blocker / "o"), "--no-progress"])
        == 2
    )
    assert (
        main(["infer", "--model", missing_model, "--input", str(src), "--output", str(tmp_path / "o"), "--no-progress"])
        == 4
    )
    assert not (src / "out").exists()


def test_skip_refuse_and_overwrite(tmp_path: Path) -> None:
    src = _folder(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out"
    assert infer(_threshold_predictor(), src, out).exit_code == 0
    sidecar = json.loads((out / "a.json").read_text())
    assert sidecar["inputs"][0]["sha256"] and sidecar["models"][0]["sha256"] and sidecar["versions"]["torch"]
    assert sidecar["settings"]["overlap"] == 0.5 and sidecar["device"] == "cpu" and sidecar["warnings"] == []
    again = infer(_threshold_predictor(), src, out)
    assert [c.status for c in again.cases] == ["skipped", "skipped"]
    # Another model (different weights -> sha256): refused per case without --overwrite.
    other = infer(_threshold_predictor(threshold=1e9), src, out)
    assert [(c.status, c.code) for c in other.cases] == [("failed", 2), ("failed", 2)]
    assert "--overwrite" in other.cases[0].message
    assert _arrays(out)["a.nii.gz"].any()  # the earlier mask is untouched
    redo = infer(_threshold_predictor(threshold=1e9), src, out, overwrite=True)
    assert [c.status for c in redo.cases] == ["ok", "ok"]
    assert not _arrays(out)["a.nii.gz"].any()  # threshold above every voxel: all background
    # Killed between the mask and the final sidecar: the "running" sidecar of the same
    # fingerprint marks the mask as this run's own, so it is redone without --overwrite.
    record = json.loads((out / "a.json").read_text())
    (out / "a.json").write_text(json.dumps({**record, "status": "running"}))
    resumed = infer(_threshold_predictor(threshold=1e9), src, out)
    assert [c.status for c in resumed.cases] == ["ok", "skipped"]
    assert json.loads((out / "a.json").read_text())["status"] == "done"
    # A changed input is not skipped either.
    F.write_image(src / "b.nii.gz", F.image(seed=7), AFFINE)
    changed = infer(_threshold_predictor(threshold=1e9), src, out)
    assert [c.status for c in changed.cases] == ["skipped", "failed"]


def test_masks_of_another_preprocessing_version_are_not_taken_for_this_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medgn.infer.run as run_module

    src = _folder(tmp_path / "in", ["a"])
    out = tmp_path / "out"
    assert infer(_threshold_predictor(), src, out).exit_code == 0
    assert json.loads((out / "a.json").read_text())["settings"]["preprocessing"] == run_module.PIPELINE_VERSION
    assert [c.status for c in infer(_threshold_predictor(), src, out).cases] == ["skipped"]
    # The same inputs, model and settings under a preprocessing of another meaning: refused, then redone.
    monkeypatch.setattr(run_module, "PIPELINE_VERSION", run_module.PIPELINE_VERSION + 1)
    other = infer(_threshold_predictor(), src, out)
    assert [(c.status, c.code) for c in other.cases] == [("failed", 2)] and "--overwrite" in other.cases[0].message
    assert [c.status for c in infer(_threshold_predictor(), src, out, overwrite=True).cases] == ["ok"]


def test_unsafe_names_stay_inside_the_output(tmp_path: Path) -> None:
    src = _folder(tmp_path / "in", ["-rf x", "é ü 東京", "a;b $(c)"])
    out = tmp_path / "out"
    report = infer(_threshold_predictor(), src, out)
    assert report.exit_code == 0
    assert sorted(c.name for c in report.cases) == sorted(["_rf x", "é ü 東京", "a;b $(c)"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    assert {"_rf x.nii.gz", "é ü 東京.nii.gz", "a;b $(c).nii.gz"} <= {p.name for p in out.iterdir()}


def test_probabilities_and_largest_component(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    img = F.image()
    img[9:11, 9:11, 9:11] = 100.0  # a second, smaller island
    F.write_image(src / "a.nii.gz", img, AFFINE)
    report = infer(_threshold_predictor(), src, tmp_path / "out", save_probabilities=True, largest_component=True)
    assert report.exit_code == 0
    mask = _arrays(tmp_path / "out")["a.nii.gz"]
    assert np.array_equal(mask == 1, F.blob())  # the island is gone
    with np.load(tmp_path / "out" / "a_probabilities.npz") as saved:
        p, affine = saved["probabilities"], saved["affine"]
    assert p.shape == (2, 12, 12, 12) and p.dtype == np.float16
    np.testing.assert_allclose(affine, AFFINE, atol=1e-6)
    p = p.astype(np.float64).transpose(1, 2, 3, 0)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=2e-3)  # float16 rounding of two terms
    assert (p[..., 1] > 0.5)[9:11, 9:11, 9:11].all()  # probabilities are not post-processed


def test_out_of_memory_fallback_is_recorded_in_the_sidecar(tmp_path: Path) -> None:
    class OOMOnce(F.ThresholdNet):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            type(self).calls += 1
            if type(self).calls == 1:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super().forward(x)

    src = _folder(tmp_path / "in", ["a"])
    report = infer(Predictor.from_modules([OOMOnce()], F.plan()), src, tmp_path / "out")
    assert report.exit_code == 0 and report.cases[0].warnings
    sidecar = json.loads((tmp_path / "out" / "a.json").read_text())
    assert "stitching moved to the CPU" in sidecar["warnings"][0]
    assert np.array_equal(_arrays(tmp_path / "out")["a.nii.gz"] == 1, F.blob())


def test_shards_split_a_folder(tmp_path: Path) -> None:
    src = _folder(tmp_path / "in", ["a", "b", "c"])
    r0 = infer(_threshold_predictor(), src, tmp_path / "out", shard="0/2")
    r1 = infer(_threshold_predictor(), src, tmp_path / "out", shard="1/2")
    assert [c.case_id for c in r0.cases] == ["a", "c"] and [c.case_id for c in r1.cases] == ["b"]
    assert (tmp_path / "out" / "report-0of2.json").is_file() and (tmp_path / "out" / "report-1of2.json").is_file()
    assert sorted(_arrays(tmp_path / "out")) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert not list((tmp_path / "out").glob(".medgn-shard-*"))  # each shard's lock folder goes with its lock


def test_channels_by_name(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    F.write_image(src / "p1_t1.nii.gz", F.image(), AFFINE)
    F.write_image(src / "p1_flair.nii.gz", np.ones((12, 12, 12), np.float32), AFFINE)
    predictor = Predictor.from_modules([F.ThresholdNet()], F.plan(in_channels=2))
    report = infer(predictor, src, tmp_path / "out", channels=["t1", "flair"])
    assert [(c.case_id, c.status) for c in report.cases] == [("p1", "ok")]
    sidecar = json.loads((tmp_path / "out" / "p1.json").read_text())
    assert [Path(i["path"]).name for i in sidecar["inputs"]] == ["p1_t1.nii.gz", "p1_flair.nii.gz"]
    # One name for a two-channel model: said as such, before any case (not a 4D-file error per case).
    with pytest.raises(UsageError, match="names 1 channel\\(s\\), the model takes 2"):
        infer(predictor, src, tmp_path / "out1", channels=["t1"])
    assert not (tmp_path / "out1" / "report.json").exists()


def _train_a_few_steps(run_dir: Path, image: Path, label: Path, plan: dict) -> int:
    """Train the tiny UNet3D for a few steps on one LA2018 case; save it as the best checkpoint."""
    from medgn.checkpoint import save_checkpoint
    from medgn.configtools import build
    from medgn.data.pipeline import val_transforms
    from medgn.models.config import UNet3DConfig
    from medgn.models.registry import build_model

    data = val_transforms(Plan.from_dict(plan))({"image": [str(image)], "label": str(label)})
    x, y = torch.as_tensor(data["image"]).float(), torch.as_tensor(data["label"]).long()
    centre = [int(c.float().mean()) for c in torch.nonzero(y[0], as_tuple=True)]
    starts = [max(0, min(c - p // 2, s - p)) for c, p, s in zip(centre, plan["patch_size"], x.shape[1:])]
    crop = tuple(slice(a, a + p) for a, p in zip(starts, plan["patch_size"]))
    xb, yb = x[(slice(None), *crop)][None], y[(0, *crop)][None]
    config = F.tiny_model_config()
    torch.manual_seed(0)
    net = build_model(
        build(UNet3DConfig, config["model"], "model"), 1, 2, plan["network"]["strides"], plan["network"]["kernel_sizes"]
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)  # large steps: a few of them must move the weights
    steps = 6  # enough to change every weight, few enough for seconds on two cores
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        loss.backward()
        opt.step()
    state = {
        "model": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "config": config,
        "plan": plan,
        "counters": {"epoch": 1, "iteration": steps},
    }
    save_checkpoint(state, run_dir / "checkpoints", tag="epoch", pointers=("latest", "best"))
    return steps


@pytest.mark.data
def test_la2018_case_keeps_its_geometry(tmp_path: Path, shared_data: Path) -> None:
    from medgn.data.io import geometry_diff, read_volume

    image = sorted((shared_data / "LA2018" / "imagesTr").glob("*.nii.gz"))[0]
    label = shared_data / "LA2018" / "labelsTr" / image.name
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / image.name).symlink_to(image)
    ref = read_volume(image)
    plan = F.plan(target_spacing=[1.25, 1.25, 1.25])  # half resolution keeps the test fast
    plan["patch_size"] = [48, 48, 32]
    _train_a_few_steps(tmp_path / "run", image, label, plan)
    assert (
        main(
            [
                "infer",
                "--model",
                str(tmp_path / "run"),
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 0
    )
    mask = read_volume(tmp_path / "out" / image.name, label=True, label_values=[0, 1])
    assert geometry_diff(ref, mask) == [] and mask.shape == ref.shape
    assert np.allclose(mask.affine, ref.affine, atol=1e-5)
    assert (mask.meta["qform_code"], mask.meta["sform_code"]) == (ref.meta["qform_code"], ref.meta["sform_code"])
    import nibabel as nib

    assert nib.load(tmp_path / "out" / image.name).get_data_dtype() == np.uint8


NO_MONAI = """
import sys
from medgn.cli import main
code = main(["infer", "--model", sys.argv[1], "--input", sys.argv[2], "--output", sys.argv[3], "--postprocess", "lcc"])
print(code, sorted(m for m in ("monai", "scipy.ndimage", "scipy.signal", "pandas") if m in sys.modules))
"""


def test_infer_segments_a_scan_without_importing_monai(tmp_path: Path) -> None:
    # Importing MONAI takes 2-3 s, longer than segmenting a scan on a CPU: inference reads, preprocesses,
    # slides its windows and inverts with medgn's own code (held to MONAI's by tests/data/test_prepare.py
    # and tests/infer/test_sliding_window.py). The largest-component filter labels without
    # scipy.ndimage, whose import took 0.1 s (held to scipy's labelling by tests/infer/test_postprocess.py).
    run = F.save_run(tmp_path / "run")
    scan = F.write_image(tmp_path / "scan.nii.gz", F.image(), AFFINE)
    out = tmp_path / "out" / "mask.nii.gz"
    proc = subprocess.run(
        [sys.executable, "-c", NO_MONAI, str(run), str(scan), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "0 []"
    assert out.is_file()


def test_a_folder_of_runs_says_which_runs_it_averaged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cv = tmp_path / "cv"
    for k, name in enumerate(("fold_0", "fold_1", "older_run")):
        F.save_run(cv / name, seed=k)
    src = _folder(tmp_path / "in", ["a"])
    assert main(["infer", "--model", str(cv), "--input", str(src), "--output", str(tmp_path / "o")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("(ensemble of 3 models: fold_0, fold_1, older_run)")
    assert main(["infer", "--model", str(cv / "fold_1"), "--input", str(src), "--output", str(tmp_path / "p")]) == 0
    assert "ensemble" not in capsys.readouterr().out  # one model: nothing to say


def test_output_format_nifti_writes_nifti_masks_for_nrrd_and_mha_scans(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import nibabel as nib

    from medgn.data.io import read_volume

    src = tmp_path / "in"
    src.mkdir()
    F.write_image(src / "a.nrrd", F.image(0), AFFINE)
    F.write_image(src / "b.mha", F.image(1), AFFINE)
    run = F.save_run(tmp_path / "run")
    base = ["infer", "--model", str(run), "--input", str(src), "--threads", "1"]
    assert main([*base, "--output", str(tmp_path / "own")]) == 0  # by default each in its own format
    assert sorted(p.name for p in (tmp_path / "own").glob("[ab].*") if p.suffix != ".json") == ["a.nrrd", "b.mha"]
    assert main([*base, "--output", str(tmp_path / "nii"), "--output-format", "nifti"]) == 0
    written = sorted(p.name for p in (tmp_path / "nii").iterdir())
    assert written == ["a.json", "a.nii.gz", "b.json", "b.nii.gz", "report.json"]
    for name in ("a", "b"):
        mask = nib.load(tmp_path / "nii" / f"{name}.nii.gz")
        same = read_volume(tmp_path / "own" / f"{name}{'.nrrd' if name == 'a' else '.mha'}", label=True)
        np.testing.assert_allclose(mask.affine, same.affine, atol=1e-5)
        assert np.array_equal(np.asanyarray(mask.dataobj), same.array)
    sidecar = json.loads((tmp_path / "nii" / "a.json").read_text())
    assert sidecar["torch_threads"] == 1  # what --threads set, not the process default


def test_postprocessing_follows_the_runs_decision_unless_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medgn.infer.postprocess import FILE, PostProcessing

    src = tmp_path / "in"
    src.mkdir()
    img = F.image()
    img[9:11, 9:11, 9:11] = 100.0  # a second, smaller island
    F.write_image(src / "a.nii.gz", img, AFFINE)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    net = Predictor.from_modules([F.ThresholdNet(0.0)], F.plan(), name=str(run / "checkpoints" / "m.pt"))
    assert net.run_dirs() == [run]

    def mask(name: str, **kw) -> np.ndarray:
        assert infer(net, src, tmp_path / name, **kw).exit_code == 0
        return _arrays(tmp_path / name)["a.nii.gz"] == 1

    island = np.zeros_like(F.blob())
    island[9:11, 9:11, 9:11] = True
    assert np.array_equal(mask("none_decided"), F.blob() | island)  # no postprocessing.json: nothing applied
    (run / FILE).write_text(json.dumps(PostProcessing({1: True}, "reference topology").to_dict()))
    assert np.array_equal(mask("auto"), F.blob())  # the run's decision: the island goes
    sidecar = json.loads((tmp_path / "auto" / "a.json").read_text())
    assert sidecar["settings"]["postprocessing"]["lcc"] == {"1": True}
    assert np.array_equal(mask("off", postprocess="none"), F.blob() | island)
    (run / FILE).write_text(json.dumps(PostProcessing({1: False}, "reference topology").to_dict()))
    assert np.array_equal(mask("kept"), F.blob() | island)  # decided against: kept
    assert np.array_equal(mask("asked", postprocess="lcc"), F.blob())
    argv = ["infer", "--model", str(run), "--input", str(src), "--output", str(tmp_path / "x")]
    assert main([*argv, "--largest-component", "--postprocess", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--largest-component" in err[0] and not (tmp_path / "x").exists()


def test_the_model_defaults_to_medgn_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Docker images set MEDGN_WEIGHTS to their baked weights, which nothing read: --model was required.
    scan = F.write_image(tmp_path / "scan.nii.gz", F.image(), AFFINE)
    monkeypatch.delenv("MEDGN_WEIGHTS", raising=False)
    assert main(["infer", "--input", str(scan), "--output", str(tmp_path / "a" / "m.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "medgn: error: --model: no model given (expected --model RUN_DIR_OR_CHECKPOINT (or MEDGN_WEIGHTS set to one))"
    ], err
    unbaked = tmp_path / "weights"  # an image built without weights: the folder holds a README only
    unbaked.mkdir()
    (unbaked / "README.md").write_text("bake a run here")
    monkeypatch.setenv("MEDGN_WEIGHTS", str(unbaked))
    assert main(["infer", "--input", str(scan), "--output", str(tmp_path / "u" / "m.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--model: no model given, and $MEDGN_WEIGHTS ({unbaked}) holds none" in err[0], err
    run = F.save_run(tmp_path / "baked")
    monkeypatch.setenv("MEDGN_WEIGHTS", str(run))
    assert main(["infer", "--input", str(scan), "--output", str(tmp_path / "b" / "m.nii.gz")]) == 0
    sidecar = json.loads(next((tmp_path / "b").glob("*.json")).read_text())
    assert str(run) in json.dumps(sidecar)
    other = F.save_run(tmp_path / "other", seed=3)  # --model given: the variable is not used
    assert (
        main(["infer", "--model", str(other), "--input", str(scan), "--output", str(tmp_path / "c" / "m.nii.gz")]) == 0
    )
    sidecar = json.dumps(json.loads(next((tmp_path / "c").glob("*.json")).read_text()))
    assert str(other) in sidecar and str(run) not in sidecar
