#!/usr/bin/env bash
# Stage a few LA2018 cases for the GPU check: copies the first N cases (image + label) of an
# MSD-format LA2018 folder and a dataset.json listing only them into a git-ignored folder
# (default carry/LA2018_mini; /carry/ is in .gitignore), so a GPU machine without our data gets
# them with the working tree (run --carry carry/LA2018_mini, ~1.7 MB + ~20 kB per case).
#
# Usage: benchmarks/stage_gpu_data.sh [N=10] [SRC=../shared/data/LA2018] [DEST=carry/LA2018_mini]
# Exit codes: 0 done, 2 usage (N not a positive integer), 3 input data (SRC lacks dataset.json or
# a listed file). DEST is written to a temporary folder first and renamed: never half-staged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N="${1:-10}"
SRC="${2:-$ROOT/../shared/data/LA2018}"
DEST="${3:-$ROOT/carry/LA2018_mini}"
PYTHON="${PYTHON:-python3}"
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
    echo "medgn: error: stage_gpu_data.sh: N must be a positive integer (got '$N', expected e.g. 10)" >&2
    exit 2
fi
if [[ ! -f "$SRC/dataset.json" ]]; then
    echo "medgn: error: $SRC/dataset.json: not found (expected an MSD-format LA2018 folder)" >&2
    exit 3
fi
TMP="$(mktemp -d "$(dirname "$DEST")/.stage.XXXXXX" 2>/dev/null || { mkdir -p "$(dirname "$DEST")"; mktemp -d "$(dirname "$DEST")/.stage.XXXXXX"; })"
trap 'rm -rf "$TMP"' EXIT
"$PYTHON" - "$SRC" "$TMP" "$N" <<'PY'
import json, shutil, sys
from pathlib import Path

src, dest, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
meta = json.loads((src / "dataset.json").read_text(encoding="utf-8"))
cases = meta["training"][:n]
for case in cases:
    for key in ("image", "label"):
        rel = Path(case[key])
        if not (src / rel).is_file():
            print(f"medgn: error: {src / rel}: listed in dataset.json but missing", file=sys.stderr)
            sys.exit(3)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dest / rel)
meta["training"] = cases
meta["numTraining"] = len(cases)
(dest / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
print(f"staged {len(cases)} cases")
PY
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
echo "into $DEST"
