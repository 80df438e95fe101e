"""benchmarks/gpu_check.sh and stage_gpu_data.sh: the CPU dry run writes every step's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "benchmarks" / "gpu_check.sh"
STAGE = ROOT / "benchmarks" / "stage_gpu_data.sh"
STEPS = ("env", "pytest_gpu", "bench_gn", "tune_gn", "bench_train", "la_smoke", "infer")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "PYTHONUTF8": "1"}


def test_stage_refuses_bad_arguments(tmp_path: Path) -> None:
    bad_n = subprocess.run([str(STAGE), "0"], capture_output=True, text=True, env=_env())
    assert bad_n.returncode == 2 and "medgn: error:" in bad_n.stderr
    missing = subprocess.run([str(STAGE), "2", str(tmp_path / "nowhere"), str(tmp_path / "d")],
                             capture_output=True, text=True, env=_env())  # fmt: skip
    assert missing.returncode == 3 and "dataset.json" in missing.stderr
    assert not (tmp_path / "d").exists()  # nothing half-staged


@pytest.mark.slow
@pytest.mark.data
def test_dry_run_runs_every_step(tmp_path: Path, shared_data: Path) -> None:
    data, out = tmp_path / "LA2018_mini", tmp_path / "out"
    staged = subprocess.run([str(STAGE), "3", str(shared_data / "LA2018"), str(data)],
                            capture_output=True, text=True, env=_env())  # fmt: skip
    assert staged.returncode == 0, staged.stderr
    meta = json.loads((data / "dataset.json").read_text(encoding="utf-8"))
    assert meta["numTraining"] == 3 and len(list((data / "imagesTr").iterdir())) == 3
    env = _env() | {"GPU_CHECK_DATA": str(data)}
    proc = subprocess.run([str(CHECK), "--dry-run", str(out)], capture_output=True, text=True,
                          env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text(encoding="utf-8").splitlines()
    assert "mode=dry-run" in summary[0] and summary[-1].startswith("total ")
    codes = {line.split()[0]: line.split()[1] for line in summary[2:-1]}
    assert codes == dict.fromkeys(STEPS, "0"), summary
    for step in STEPS:
        assert (out / f"{step}.log").stat().st_size > 0
    assert '"versions"' in (out / "env.log").read_text(encoding="utf-8")
    assert "skipped" in (out / "pytest_gpu.log").read_text(encoding="utf-8")  # no CUDA here
    gn = json.loads((out / "bench" / "group_norm_cpu.json").read_text(encoding="utf-8"))
    assert len(gn["rows"]) == 18 and all(r["check_ok"] for r in gn["rows"] if r["provider"] == "medgn")
    tune = json.loads((out / "bench" / "group_norm_tune_cpu.json").read_text(encoding="utf-8"))
    assert len(tune["rows"]) == 4 and all(r["check_ok"] for r in tune["rows"])
    assert (out / "bench" / "host_profile.txt").stat().st_size > 0
    train = json.loads((out / "bench" / "train_cpu.json").read_text(encoding="utf-8"))
    assert [r["norm"] for r in train["rows"]] == ["group", "group_torch", "instance"]
    assert (out / "la_smoke").is_dir() and any((out / "la_smoke").iterdir())
    masks = sorted(p.name for p in (out / "infer").glob("*.nii.gz"))
    assert masks == sorted(p.name for p in (data / "imagesTr").iterdir())  # one mask per staged scan
