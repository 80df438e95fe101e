# medgn developer commands. `make test` and `make demo` set everything up from nothing:
# a virtual environment in .venv with medgn installed (editable) under constraints.txt.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.medgn-installed
EXTRAS ?= test,demo
# Two pytest workers on a 2-core machine; set PYTEST_WORKERS=0 to run in one process.
PYTEST_WORKERS ?= 2

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "medgn needs Python >= 3.10")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Python's UTF-8 mode: text I/O in the tests must not depend on the C locale, which native
# readers loaded during the run may reset to ASCII.
test: $(STAMP) lint
	PYTHONUTF8=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --durations=15 tests

demo: $(STAMP)
	$(PY) -m medgn.demo --out demo_run

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_run
