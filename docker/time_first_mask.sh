#!/usr/bin/env bash
# Seconds from `docker run` to the first mask on disk, for docker/README.md's figures.
# Usage: docker/time_first_mask.sh IMAGE MODEL_DIR SCAN [THREADS]
# The container runs as in production: --network none --read-only --tmpfs /tmp, non-root.
set -euo pipefail
image=$1 model=$(realpath "$2") scan=$(realpath "$3") threads=${4:-1}
out=$(mktemp -d)
chmod 0777 "$out"
start=$(date +%s.%N)
docker run --rm -d --network none --read-only --tmpfs /tmp --user 10001:10001 --cap-drop ALL \
    -v "$model:/model:ro" -v "$scan:/in/$(basename "$scan"):ro" -v "$out:/out" \
    "$image" infer --model /model --input "/in/$(basename "$scan")" --output /out --device cpu \
    --threads "$threads" --no-progress >/dev/null
deadline=$((SECONDS + 600))
until compgen -G "$out/*.nii.gz" >/dev/null || compgen -G "$out/*.nrrd" >/dev/null; do
    ((SECONDS < deadline)) || { echo "no mask within 600 s" >&2; exit 1; }
    sleep 0.05
done
first=$(date +%s.%N)
echo "first mask after $(echo "$first - $start" | bc) s ($(basename "$scan"), $threads thread(s), image $image)"
until [[ -f "$out/report.json" ]] || ((SECONDS > deadline)); do sleep 0.1; done
rm -rf "$out"
