"""benchmarks/bench_group_norm.py: the CPU smoke run writes rows of the documented schema."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_group_norm.py"
REQUIRED = {"device", "shape", "groups", "layout", "dtype", "pass", "provider", "median_ms",
            "pct_roofline", "speedup_vs_eager_autocast", "speedup_vs_compile", "moved_volumes",
            "min_volumes", "check_ok"}  # fmt: skip


def _load():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("bench_group_norm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_rows_follow_the_schema(tmp_path: Path) -> None:
    bench = _load()
    assert bench.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "group_norm_cpu.json").read_text(encoding="utf-8"))
    rows = doc["rows"]
    # 2 configurations x 3 providers (no compile on CPU) x 3 passes.
    assert len(rows) == 18 and doc["device"] == "cpu"
    for r in rows:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["device"] == "cpu" and r["shape"] == "2x16x6x6x6" and r["dtype"] == "bfloat16"
        assert r["pass"] in ("fwd", "bwd", "fwd+bwd") and r["median_ms"] > 0
        assert r["layout"] in ("contiguous", "channels_last") and isinstance(r["check_ok"], bool)
        assert r["speedup_vs_compile"] is None  # compile is not measured on CPU
        if r["provider"] == "medgn":
            assert r["check_ok"] and r["check_rel_err"] < 2e-2  # bf16 output rounding
            assert r["speedup_vs_eager"] > 0 and r["speedup_vs_eager_autocast"] > 0
        else:
            assert r["moved_volumes"] is None and r["speedup_vs_eager"] is None
    medgn = {(r["layout"], r["pass"]): r for r in rows if r["provider"] == "medgn"}
    # G from the group rule (16 channels -> min(32, 16) = 16 groups) and G = gcd(16, 32) = 16.
    assert medgn["contiguous", "fwd"]["groups"] == 16 and medgn["channels_last", "fwd"]["groups"] == 16
    # Fused paths: 2 / 3 volumes without a residual; with one (and leaky_relu) 3 / 5.
    assert [medgn["contiguous", p]["moved_volumes"] for p in ("fwd", "bwd", "fwd+bwd")] == [2, 3, 5]
    assert [medgn["channels_last", p]["moved_volumes"] for p in ("fwd", "bwd", "fwd+bwd")] == [
        3,
        5,
        8,
    ]
    assert medgn["channels_last", "bwd"]["min_volumes"] == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_cuda_it_says_so_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert _load().main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
