#!/usr/bin/env bash
# The GPU check of medgn in one command (at most 9.5 minutes of wall time on an H100/H200):
# versions and nvidia-smi, the `gpu`-marked tests, the GroupNorm kernel benchmark (quick), the
# kernels' tuning sweep, the training benchmark (quick), a 60-second LA2018 training smoke run on
# staged cases and
# `medgn infer` of the staged scans with its model. Every step runs
# under its own timeout and the next step runs whatever the previous one returned; per-step exit
# codes and seconds go to summary.txt. Everything is written under the output folder.
#
# Usage: benchmarks/gpu_check.sh [OUTDIR]          (default: $OUT, else gpu_check_out)
#        benchmarks/gpu_check.sh --dry-run [OUTDIR] (or GPU_CHECK_DRY_RUN=1): the same steps with
#        CPU smoke settings (Triton's interpreter, tiny shapes, a 20-second training run): about a
#        minute of CPU time, 3-6 minutes of wall time on a busy 2-core machine.
# Data:  benchmarks/stage_gpu_data.sh 10  -> carry/LA2018_mini (git-ignored); carry it to the GPU
#        machine with the working tree. GPU_CHECK_DATA overrides the folder.
# Env:   PYTHON (default python3).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY="${GPU_CHECK_DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUTDIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
PYTHON="${PYTHON:-python3}"
DATA="${GPU_CHECK_DATA:-$ROOT/carry/LA2018_mini}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUTF8=1
SUMMARY="$OUTDIR/summary.txt"
if [[ "$DRY" == "1" ]]; then
    export TRITON_INTERPRET=1  # the CPU dry run only: kernels through Triton's interpreter
    DEVICE=cpu
else
    DEVICE=cuda
fi
printf 'medgn gpu_check %s  mode=%s  device=%s\n%-14s %4s %8s\n' "$(date -u +%FT%TZ)" \
    "$([[ $DRY == 1 ]] && echo dry-run || echo gpu)" "$DEVICE" step rc seconds > "$SUMMARY"

# run STEP TIMEOUT_S CMD...: log to $OUTDIR/STEP.log, record rc and seconds, never abort.
run() {
    local step="$1" limit="$2"
    shift 2
    local t0=$SECONDS rc
    echo "== $step: $*" | tee -a "$OUTDIR/commands.txt"
    timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$step.log" 2>&1
    rc=$?
    printf '%-14s %4d %8d\n' "$step" "$rc" "$((SECONDS - t0))" >> "$SUMMARY"
    tail -n 3 "$OUTDIR/$step.log"
    return 0
}

# Step budgets (seconds), summing to about 9.5 minutes on a GPU: the benchmarks write their rows as
# they go, so a step cut by its timeout still leaves its finished rows.
if [[ "$DRY" == "1" ]]; then
    # Generous limits: a shared 2-core machine runs these in ~1 min of CPU time but 3-6 min wall.
    T_ENV=60 T_TEST=180 T_GN=180 T_TUNE=180 T_TRAIN=180 T_LA=360 T_INF=300 BUDGET=20s INFER_DEVICE=cpu
    GN_ARGS=(--device cpu) TUNE_ARGS=(--device cpu --jobs 1) TRAIN_ARGS=(--device cpu --variants eager)
    LA_ARGS=(--config configs/la2018_cpu.yaml --device cpu --set train.epochs=1
             --set train.iters_per_epoch=2 --set train.val_every=1 --set train.batch_size=1
             --set train.warmup_iters=0
             --set "plan.patch_size=[32,32,32]" --set data.num_workers=0)
    PYTEST_OPTS=()
else
    T_ENV=20 T_TEST=130 T_GN=80 T_TUNE=60 T_TRAIN=120 T_LA=110 T_INF=40 BUDGET=60s INFER_DEVICE=cuda
    GN_ARGS=(--device cuda --quick) TUNE_ARGS=(--device cuda --quick) TRAIN_ARGS=(--device cuda --quick)
    LA_ARGS=(--config configs/la2018.yaml --device cuda --set train.epochs=40
             --set train.iters_per_epoch=25 --set train.val_every=5 --set data.num_workers=4)
    # First-time Triton compilation dominates the GPU tests (about 160 tests took over 110 s on
    # 8 workers of an H200 machine): spread it over 12 workers if xdist is installed (16 cores
    # there), and cap each test so one hang cannot take the step's whole budget.
    PYTEST_OPTS=()
    "$PYTHON" -c "import xdist" 2>/dev/null && PYTEST_OPTS=(-n 12)
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null && PYTEST_OPTS+=(--timeout 90)
fi

env_report() {
    nvidia-smi || echo "nvidia-smi: not available"
    "$PYTHON" - <<'PY'
import json, torch
from medgn.environment import versions
info = {"versions": versions(), "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info |= {"device": p.name, "sms": p.multi_processor_count, "l2_bytes": p.L2_cache_size,
             "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"}
print(json.dumps(info, indent=2))
PY
}

run env "$T_ENV" bash -c "$(declare -f env_report); PYTHON='$PYTHON' env_report"
# -v with --tb=short: every test's outcome is in the log as it happens, so a step cut by its
# timeout still names the tests that failed (the junit file is written only at the end).
run pytest_gpu "$T_TEST" "$PYTHON" -m pytest -p no:cacheprovider -v --tb=short -rfE -m gpu "${PYTEST_OPTS[@]}" \
    --junitxml="$OUTDIR/pytest_gpu.xml" tests/ops tests/benchmarks
run bench_gn "$T_GN" "$PYTHON" benchmarks/bench_group_norm.py "${GN_ARGS[@]}" --out "$OUTDIR/bench"
run tune_gn "$T_TUNE" "$PYTHON" benchmarks/tune_group_norm.py "${TUNE_ARGS[@]}" --out "$OUTDIR/bench"
run bench_train "$T_TRAIN" "$PYTHON" benchmarks/bench_train.py "${TRAIN_ARGS[@]}" --out "$OUTDIR/bench"
if [[ -f "$DATA/dataset.json" ]]; then
    run la_smoke "$T_LA" "$PYTHON" -m medgn train --data "$DATA" --out "$OUTDIR/la_smoke" --fold 0 \
        --time-budget "$BUDGET" "${LA_ARGS[@]}"
    # Whole-scan inference of the staged (training) scans with the smoke run's model: the timing
    # and the GPU path of `medgn infer`, not an accuracy figure.
    run infer "$T_INF" "$PYTHON" -m medgn infer --model "$OUTDIR/la_smoke" --input "$DATA/imagesTr" \
        --output "$OUTDIR/infer" --device "$INFER_DEVICE" --no-progress
else
    echo "la_smoke: no staged data at $DATA (run benchmarks/stage_gpu_data.sh)" | tee "$OUTDIR/la_smoke.log"
    printf '%-14s %4s %8d\n' la_smoke skip 0 infer skip 0 >> "$SUMMARY"
fi
printf 'total %d s\n' "$SECONDS" >> "$SUMMARY"
cat "$SUMMARY"
