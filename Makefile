# medgn developer commands. `make test` and `make demo` set everything up from nothing:
# a virtual environment in .venv with medgn installed (editable) under constraints.txt.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.medgn-installed
EXTRAS ?= test,demo
# Two pytest workers on a 2-core machine; set PYTEST_WORKERS=0 to run in one process.
PYTEST_WORKERS ?= 2

.PHONY: install test lint demo bench clean wheelhouse docker-image docker-test

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "medgn needs Python >= 3.10")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Python's UTF-8 mode: text I/O in the tests must not depend on the C locale, which native
# readers loaded during the run may reset to ASCII.
test: $(STAMP) lint
	PYTHONUTF8=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --durations=15 tests

demo: $(STAMP)
	$(PY) -m medgn.demo --out demo_run

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

# Docker (docker/README.md). wheelhouse: medgn's wheel and every dependency, pinned by
# constraints.txt, for the image's Python (WHEELHOUSE_PYTHON), so `docker-image` builds offline.
WHEELHOUSE_PYTHON ?= 3.11
# Extra index for the wheelhouse, e.g. https://download.pytorch.org/whl/cpu (PyTorch's CPU wheel)
# where pip's own configuration does not already find it.
WHEELHOUSE_INDEX  ?=
DOCKER_IMAGE      ?= medgn:cpu
# Empty: the Dockerfile's default base (python:3.11.11-slim-bookworm); any Debian-based image works.
DOCKER_BASE       ?=
# Only what the image needs goes to the engine (the classic builder has no per-Dockerfile ignore).
DOCKER_CONTEXT    := pyproject.toml README.md constraints.txt medgn configs docker

wheelhouse: $(STAMP)
	PYTHON=$(PY) WHEELHOUSE_PYTHON=$(WHEELHOUSE_PYTHON) WHEELHOUSE_INDEX=$(WHEELHOUSE_INDEX) \
	  bash docker/make_wheelhouse.sh

# No network needed: run `make wheelhouse` first (where the packages are reachable).
docker-image:
	@ls docker/wheelhouse/medgn-*.whl docker/wheelhouse/torch-*.whl >/dev/null 2>&1 || \
	  { echo "docker-image: docker/wheelhouse is empty: run 'make wheelhouse' where PyPI is reachable" >&2; exit 2; }
	tar -c --exclude=__pycache__ --exclude='*.pyc' $(DOCKER_CONTEXT) | DOCKER_BUILDKIT=0 docker build --network none \
	  -f docker/Dockerfile.cpu --build-arg WHEELHOUSE=1 $(if $(DOCKER_BASE),--build-arg BASE=$(DOCKER_BASE)) \
	  -t $(DOCKER_IMAGE) -

# Builds medgn:cpu offline (starting a private engine and a debootstrap base when needed) and
# runs real scans through `docker run`; prints SKIP and succeeds where no engine can be had.
docker-test: $(STAMP)
	MEDGN_PYTHON=$(abspath $(PY)) bash docker/ci_test.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_run
