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
        assert r["graph_ms"] is None and r["graph_speedup_vs_eager"] is None  # CUDA graphs: CUDA only
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


def test_check_tolerates_kink_flips_but_not_a_wrong_group() -> None:
    """The timed-output check: a few leaky_relu sign flips (fp32 vs float64 rounding at the kink,
    over 10^8 elements on a GPU) pass; a group normalised with the wrong statistics fails."""
    from medgn.ops import group_norm_ref

    bench = _load()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, 32, generator=gen).requires_grad_()
    w, b = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    y = group_norm_ref(x, 2, w, b, 1e-5, "leaky_relu")
    (dx,) = torch.autograd.grad(y, x, dy)
    y, dx = y.detach(), dx.detach()
    assert bench._check(y, dx, [x, w, b, None], dy, 2, "leaky_relu") < 1e-5
    flipped = dx.clone().flatten()
    flipped[:3] += 0.99 * dy.flatten()[:3] * w[0].abs()  # three kink flips in channel 0 (rstd ~ 1)
    assert bench._check(y, flipped.view_as(dx), [x, w, b, None], dy, 2, "leaky_relu") < 1e-2
    wrong = y.clone()
    wrong[:, 2:] = group_norm_ref(x.detach()[:, 2:] + 0.5, 1, w[2:], b[2:], 1e-5, "leaky_relu") * 1.2
    assert bench._check(wrong, dx, [x, w, b, None], dy, 2, "leaky_relu") > 0.05


def test_a_failed_graph_capture_turns_graph_timing_off_for_that_provider() -> None:
    """A capture that fails (here: no CUDA) gives None, and that provider is not tried again."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine where CUDA calls fail")
    bench = _load()
    timer = bench.Timer(torch.device("cpu"), 1, 1)
    timer.device = torch.device("cuda")  # pretend: the capture itself fails on this machine
    assert bench.graph_median_ms(timer, lambda: None, "compile") is None
    assert timer.graph_failed == {"compile"}
    assert bench.graph_median_ms(timer, lambda: None, "compile") is None
    assert bench.graph_median_ms(timer, lambda: None, "medgn") is None and timer.graph_failed == {"compile", "medgn"}
