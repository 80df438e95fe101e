"""Under load: 50 cases in one ``medgn infer`` process, and two shards in parallel on one folder.

Peak RSS is read (``resource.getrusage``) in a subprocess after every case of a 50-case folder run:
after the first 10 cases it must not grow by more than :data:`GROWTH_BOUND` over the next 40. Two
processes ``--shard 0/2`` and ``--shard 1/2`` run at the same time on one folder into one output
folder and together give exactly the masks (byte-identical arrays) of one unsharded run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medgn.data.io import read_volume
from tests.reliability.conftest import child_env, cli, image_array, medgn_cmd, write_nifti

# (X, Y, Z) of each case: large enough that keeping one case's arrays alive (image, pipeline
# copies, probabilities: ~0.5 MiB) per case would add 20 MiB over 40 cases.
CASE_SHAPE = (24, 20, 16)
# Peak-RSS growth allowed from case 10 to case 50, KiB: allocator and import noise stays within a
# few MiB once the first cases have warmed every code path; a leak of one case's arrays per case
# (~0.5 MiB each) would exceed it.
GROWTH_BOUND = 16 * 1024

PEAKS = """
import json, resource, sys
import medgn.infer.run as run
from medgn.infer.predictor import load_predictor
peaks = []
original = run.run_case
def measured(*args, **kwargs):
    outcome = original(*args, **kwargs)
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    return outcome
run.run_case = measured
report = run.infer(load_predictor(sys.argv[1]), sys.argv[2], sys.argv[3])
print(json.dumps({"peaks": peaks, "exit": report.exit_code}))
"""


def _cases(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        write_nifti(folder / f"case{i:02d}.nii.gz", image_array(i, CASE_SHAPE))
    return folder


@pytest.fixture(scope="module")
def fifty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cases(tmp_path_factory.mktemp("load") / "in", 50)


def test_peak_rss_does_not_grow_with_the_number_of_cases(fifty: Path, model_run: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PEAKS, str(model_run), str(fifty), str(tmp_path / "out")],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    peaks = result["peaks"]
    assert result["exit"] == 0 and len(peaks) == 50
    growth = peaks[49] - peaks[9]
    print(
        f"peak RSS after 10 cases {peaks[9] / 1024:.1f} MiB, after 50 {peaks[49] / 1024:.1f} MiB, growth "
        f"{growth / 1024:.2f} MiB"
    )
    assert growth < GROWTH_BOUND, peaks


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: read_volume(p, label=True).array for p in sorted(folder.glob("case*.nii.gz"))}


def test_two_shards_in_parallel_equal_one_unsharded_run(
    model_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = _cases(tmp_path / "in", 10)
    # One CPU thread everywhere: the same kernels, so equal masks are expected bit for bit.
    argv = ["infer", "--model", model_run, "--input", inputs, "--no-progress", "--threads", "1"]
    assert cli([*argv, "--output", tmp_path / "single"], capsys).code == 0
    shared = tmp_path / "sharded"
    procs = [
        subprocess.Popen(
            medgn_cmd([*argv, "--output", shared, "--shard", f"{i}/2"]),
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    expected, got = _masks(tmp_path / "single"), _masks(shared)
    assert sorted(got) == sorted(expected) == [f"case{i:02d}.nii.gz" for i in range(10)]
    for name, mask in expected.items():
        assert got[name].dtype == mask.dtype and got[name].tobytes() == mask.tobytes(), name
    reports = [json.loads((shared / f"report-{i}of2.json").read_text()) for i in range(2)]
    assert sorted(c["case_id"] for r in reports for c in r["cases"]) == [f"case{i:02d}" for i in range(10)]
