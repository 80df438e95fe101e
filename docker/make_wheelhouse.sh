#!/usr/bin/env bash
# Fill docker/wheelhouse with medgn's wheel and every dependency for the image's Python, so the
# image builds with no network:  docker build --build-arg WHEELHOUSE=1 ...
#
# Environment:
#   PYTHON             interpreter whose pip builds and downloads (default python3)
#   WHEELHOUSE         target folder (default docker/wheelhouse)
#   WHEELHOUSE_PYTHON  the image's Python version (default 3.11: Debian bookworm, python:3.11-slim)
#   WHEELHOUSE_PINS    extra constraints file, e.g. a `pip freeze` of a virtual environment whose
#                      versions the image must match exactly
#   WHEELHOUSE_INDEX   an extra index, e.g. https://download.pytorch.org/whl/cpu for PyTorch's CPU
#                      wheel (PyPI's torch for Linux is the CUDA build, gigabytes larger)
# Dependencies are pinned by constraints.txt (torch 2.13.0). pip's own configuration decides where
# they come from (an index, --find-links folders holding PyTorch's CPU wheel, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-docker/wheelhouse}
PYVER=${WHEELHOUSE_PYTHON:-3.11}
ABI="cp${PYVER/./}"

mkdir -p "$WHEELHOUSE"
rm -f "$WHEELHOUSE"/medgn-*.whl  # the version stays 0.1.0 while the sources change: always rebuild
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WHEELHOUSE" .
wheel=$(ls "$WHEELHOUSE"/medgn-*.whl)

constraints=(-c constraints.txt)
if [[ -n "${WHEELHOUSE_PINS:-}" ]]; then
    constraints+=(-c "$WHEELHOUSE_PINS")
fi
if [[ -n "${WHEELHOUSE_INDEX:-}" ]]; then
    constraints+=(--extra-index-url "$WHEELHOUSE_INDEX")
fi
# Binary wheels for x86_64 Linux with glibc up to 2.36 (Debian bookworm); pip needs the tags spelled
# out when it downloads for another interpreter.
platforms=()
for minor in 36 35 34 33 32 31 28 27 24 17 5; do
    platforms+=(--platform "manylinux_2_${minor}_x86_64")
done
platforms+=(--platform manylinux2014_x86_64 --platform linux_x86_64)
"$PYTHON" -m pip download --quiet --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --abi "$ABI" --abi abi3 --abi none "${platforms[@]}" \
    "${constraints[@]}" --dest "$WHEELHOUSE" "$wheel"
echo "wheelhouse: $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1) in $WHEELHOUSE"
