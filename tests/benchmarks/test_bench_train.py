"""benchmarks/bench_train.py: the CPU smoke run measures every requested norm and variant."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train.py"


def _load():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_rows(tmp_path: Path) -> None:
    argv = ["--device", "cpu", "--norms", "group,instance", "--compile-backend", "eager",
            "--out", str(tmp_path)]  # fmt: skip
    assert _load().main(argv) == 0
    doc = json.loads((tmp_path / "train_cpu.json").read_text(encoding="utf-8"))
    rows = doc["rows"]
    assert [(r["variant"], r["norm"]) for r in rows] == [
        ("eager", "group"), ("eager", "instance"), ("compile", "group"), ("compile", "instance")
    ]  # fmt: skip
    for r in rows:
        assert r["patch"] == "16x16x16" and r["features"] == [8, 16, 32] and r["batch"] == 2
        assert r["it_per_s_median"] > 0 and len(r["it_per_s_all"]) == 2
        assert r["peak_mib"] is None  # CPU: no CUDA allocator peak
        assert 0.5 < r["estimate_mib"] < 100  # 3-stage net at 16^3: a few MiB
    header = (tmp_path / "train_cpu.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header.startswith("device,norm,variant,patch")


def test_unknown_norm_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert _load().main(["--device", "cpu", "--norms", "batchy"]) == 2
    assert "medgn: error: --norms" in capsys.readouterr().out
