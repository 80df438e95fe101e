#!/usr/bin/env bash
# make docker-test: build the CPU image offline and run real scans through `docker run`.
#
# 1. a Docker engine: the one DOCKER_HOST (or the default socket) reaches, else a private dockerd
#    (no bridge, no iptables; overlay2 storage where an overlay mount works, else vfs) started as
#    root under $MEDGN_DOCKER_STATE, installing Debian's docker.io first when needed; it is stopped
#    on exit.
# 2. a Debian base with python3: $MEDGN_DOCKER_BASE when given, else python:3.11.11-slim-bookworm if
#    present or pullable, else medgn-base:bookworm made with debootstrap from apt's Debian mirror.
# 3. docker/wheelhouse pinned to the virtual environment's exact versions (same torch wheel), and
#    medgn:cpu built from it with no network (WHEELHOUSE=1).
# 4. tests/docker/test_image.py against the image (masks byte-identical to the venv's, ...).
# An environment that cannot give an engine, a base or the disk for the build (it says how much)
# prints a SKIP banner and exits 0; a failing build or test exits non-zero.
# Reruns reuse the engine's data root, the base and the build cache, and prune what no tag reaches.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${MEDGN_PYTHON:-$REPO/.venv/bin/python}
# Engine data, logs and the base tar; per user, so that a non-root run never needs root's folder.
STATE=${MEDGN_DOCKER_STATE:-/var/tmp/medgn-docker$([[ $EUID -eq 0 ]] || echo "-$EUID")}
IMAGE=${MEDGN_DOCKER_IMAGE:-medgn:cpu}
PUBLIC_BASE=python:3.11.11-slim-bookworm
LOCAL_BASE=medgn-base:bookworm
BASE_TAR=$STATE/medgn-base-bookworm.tar
export DOCKER_BUILDKIT=0  # the classic builder ships with every engine; BuildKit may be absent
mkdir -p "$STATE"

say() { printf '[docker-test %(%H:%M:%S)T] %s\n' -1 "$*"; }
skip() {
    printf '\n%s\n' "################################################################"
    printf '### SKIP docker-test: %s\n' "$*"
    printf '%s\n\n' "################################################################"
    exit 0
}

STARTED_PID=""
cleanup() {
    if [[ -n "$STARTED_PID" ]] && kill -0 "$STARTED_PID" 2>/dev/null; then
        say "stopping the dockerd this test started (pid $STARTED_PID)"
        kill -TERM "$STARTED_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$STARTED_PID" 2>/dev/null || break; sleep 0.5; done
    fi
}
trap cleanup EXIT

engine_answers() { timeout 20 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

debian_mirror() {
    # The Debian mirror apt uses (deb822 .sources or one-line .list), default deb.debian.org.
    local found
    found=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -v '^\s*#' | grep -oE 'https?://[^ ]+/debian/?' | grep -v security | head -n1 || true)
    echo "${found:-http://deb.debian.org/debian}"
}

storage_driver() {
    # overlay2 shares layers; vfs copies the whole file system into every layer and container (a
    # 1.5 GB image then costs minutes per `docker run` on a busy disk). Probe an overlay mount where
    # the engine will keep its data.
    local probe="$STATE/overlay-probe" driver=vfs
    mkdir -p "$probe"/{lower,upper,work,merged}
    if mount -t overlay overlay -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
        "$probe/merged" 2>/dev/null; then
        umount "$probe/merged"
        driver=overlay2
    fi
    rm -rf "$probe"
    echo "${MEDGN_DOCKER_STORAGE:-$driver}"
}

apt_install() {
    command -v apt-get >/dev/null || return 1
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

# ---- 1. engine ---------------------------------------------------------------------------------
command -v docker >/dev/null || { [[ $EUID -eq 0 ]] && apt_install docker.io; } || true
command -v docker >/dev/null || skip "no docker client and none installable (not root or no apt)"
if ! engine_answers; then
    export DOCKER_HOST="unix://$STATE/docker.sock"
    if ! engine_answers; then
        [[ $EUID -eq 0 ]] || skip "no Docker engine reachable and not root to start one"
        if ! command -v dockerd >/dev/null; then
            say "installing Debian's docker.io for dockerd"
            apt_install docker.io || skip "no dockerd and apt-get could not install docker.io"
        fi
        mkdir -p "$STATE/data" "$STATE/exec"
        rm -f "$STATE/docker.sock" "$STATE/dockerd.pid"
        driver=$(storage_driver)
        say "starting dockerd ($driver) on $DOCKER_HOST"
        dockerd --storage-driver="$driver" --iptables=false --ip-masq=false --bridge=none \
            --data-root "$STATE/data" --exec-root "$STATE/exec" --pidfile "$STATE/dockerd.pid" \
            -H "$DOCKER_HOST" >"$STATE/dockerd.log" 2>&1 &
        STARTED_PID=$!
        for _ in $(seq 120); do engine_answers && break; sleep 0.5; done
        engine_answers || { tail -n 20 "$STATE/dockerd.log" >&2; skip "dockerd did not start (log above)"; }
    fi
fi
say "engine $(docker version --format '{{.Server.Version}}') at ${DOCKER_HOST:-the default socket}"

# ---- 2. base -----------------------------------------------------------------------------------
if [[ -n "${MEDGN_DOCKER_BASE:-}" ]]; then
    BASE=$MEDGN_DOCKER_BASE
elif docker image inspect "$PUBLIC_BASE" >/dev/null 2>&1; then
    BASE=$PUBLIC_BASE
elif docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    BASE=$LOCAL_BASE
elif timeout 60 docker pull -q "$PUBLIC_BASE" >/dev/null 2>&1; then
    BASE=$PUBLIC_BASE
elif [[ -s "$BASE_TAR" ]]; then
    say "importing $LOCAL_BASE from $BASE_TAR"
    docker import - "$LOCAL_BASE" <"$BASE_TAR" >/dev/null
    BASE=$LOCAL_BASE
else
    say "no registry answers: making $LOCAL_BASE with debootstrap"
    [[ $EUID -eq 0 ]] || skip "no base image, and debootstrap needs root"
    command -v debootstrap >/dev/null || apt_install debootstrap || skip "debootstrap not installable"
    rootfs="$STATE/rootfs.tmp"
    rm -rf "$rootfs"
    mirror=$(debian_mirror)
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$mirror" \
        >"$STATE/debootstrap.log" 2>&1 || { tail -n 20 "$STATE/debootstrap.log" >&2; rm -rf "$rootfs"; skip "debootstrap from $mirror failed (log above)"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # Kept as a tar: a new data root or storage driver re-imports it instead of bootstrapping again.
    tar -C "$rootfs" -cf "$BASE_TAR.part" . && mv "$BASE_TAR.part" "$BASE_TAR"
    docker import - "$LOCAL_BASE" <"$BASE_TAR" >/dev/null
    rm -rf "$rootfs"
    BASE=$LOCAL_BASE
fi
say "base image $BASE"

# ---- 3. wheelhouse and image -------------------------------------------------------------------
[[ -x "$PY" ]] || { echo "docker-test: no virtual environment at $PY (make install)" >&2; exit 1; }
pins="$STATE/venv-pins.txt"
# The venv's exact versions (medgn itself excluded): the image must run the same torch, numpy, ...
"$PY" -m pip freeze --disable-pip-version-check 2>/dev/null | grep -viE '^(-e|#)|^medgn[ =@]' >"$pins"
if ! PYTHON=$PY WHEELHOUSE_PINS=$pins bash docker/make_wheelhouse.sh >"$STATE/wheelhouse.log" 2>&1; then
    grep -v 'is ignored: it is neither' "$STATE/wheelhouse.log" | tail -n 30 >&2
    echo "docker-test: make_wheelhouse.sh failed (log above)" >&2
    exit 1
fi
tail -n 1 "$STATE/wheelhouse.log"
ls docker/wheelhouse/torch-*.whl >/dev/null || { echo "docker-test: the wheelhouse has no torch" >&2; exit 1; }
# The classic builder keeps every intermediate image as its cache, and vfs stores each as a full
# copy of the file system: every change to medgn's sources leaves a few GB behind. The build stage
# is tagged ($BUILD_TAG) so that its cache survives; in the engine this test started, what no tag
# reaches is pruned before the build (space for it) and after it (what it replaced). Someone else's
# engine keeps its images: there only the image a rebuild replaced is removed.
BUILD_TAG=$IMAGE-build
[[ "${IMAGE##*/}" == *:* ]] || BUILD_TAG=$IMAGE:build
prune() {
    [[ -n "$STARTED_PID" ]] || return 0
    docker container prune -f >/dev/null 2>&1 || true
    docker image prune -f >/dev/null 2>&1 || true
}
free_gb() { df -Pk "$STATE" | awk 'NR == 2 { printf "%d", $4 / 1048576 }'; }
prune
NEED_GB=${MEDGN_DOCKER_MIN_FREE_GB:-$([[ $(docker info -f '{{.Driver}}') == vfs ]] && echo 15 || echo 6)}
(($(free_gb) >= NEED_GB)) \
    || skip "$(free_gb) GB free under $STATE, the build needs about $NEED_GB GB (MEDGN_DOCKER_STATE moves it)"
say "building $IMAGE (offline, from docker/wheelhouse; $(free_gb) GB free)"
old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
start=$(date +%s)
context() { tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md constraints.txt medgn configs docker; }
build() { docker build --network none -f docker/Dockerfile.cpu --build-arg BASE="$BASE" --build-arg WHEELHOUSE=1 "$@" -; }
{ context | build --target build -t "$BUILD_TAG" && context | build -t "$IMAGE"; } >"$STATE/build.log" 2>&1 \
    || { tail -n 40 "$STATE/build.log" >&2; prune; echo "docker-test: the image build failed" >&2; exit 1; }
new_id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
if [[ -n "$old_id" && "$old_id" != "$new_id" ]]; then docker rmi "$old_id" >/dev/null 2>&1 || true; fi
prune
say "built $IMAGE in $(($(date +%s) - start)) s, $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}'); $(free_gb) GB free"

# ---- 4. tests ----------------------------------------------------------------------------------
MEDGN_DOCKER_IMAGE=$IMAGE PYTHONUTF8=1 "$PY" -m pytest -p no:cacheprovider -q -m docker \
    --durations=10 tests/docker/test_image.py
