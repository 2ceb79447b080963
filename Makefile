# attnflows: `make serve` sets everything up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install prepare serve demo test bench clean

# torch==2.13.0 first: the CPU build (a bare `torch` would pull several GB of CUDA).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-warn-script-location --upgrade pip
	$(PY) -m pip install --quiet --no-warn-script-location torch==2.13.0
	$(PY) -m pip install --quiet --no-warn-script-location -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Fine-tune the default model and extract the default corpus run (cached: seconds on a second call).
prepare: install
	$(VENV)/bin/attnflows prepare

# Until the dashboard lands (issue 4), serving means the text demo of the default pair.
serve: prepare
	$(VENV)/bin/attnflows demo --quiet

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/bench_flows.py
	$(PY) benchmarks/bench_heads.py
	$(PY) benchmarks/bench_embedding.py

clean:
	rm -rf $(VENV) .pytest_cache
