# attnflows: `make serve` sets everything up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install browser prepare serve test bench templates clean

# torch==2.13.0 first: the CPU build (a bare `torch` would pull several GB of CUDA).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-warn-script-location --upgrade pip
	$(PY) -m pip install --quiet --no-warn-script-location torch==2.13.0
	$(PY) -m pip install --quiet --no-warn-script-location -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Browser tests drive Debian's chromium (a Playwright browser download never works offline).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

# Fine-tune the default model and extract the default corpus run (cached: seconds on a second call).
prepare: install
	$(VENV)/bin/attnflows prepare

serve: prepare
	$(VENV)/bin/attnflows serve

# On failure, name the failed tests once more on the last line (a CI log may keep only its tail).
test: install browser
	$(PY) -m pytest || { status=$$?; $(PY) -c 'import json; print("failed:", " ".join(json.load(open(".pytest_cache/v/cache/lastfailed"))))' || true; exit $$status; }

bench: install browser
	$(PY) -m pip install --quiet --no-warn-script-location -e ".[dev,bench]"
	$(PY) benchmarks/bench_flows.py
	$(PY) benchmarks/bench_heads.py
	$(PY) benchmarks/bench_embedding.py
	$(PY) benchmarks/bench_long_context.py
	$(PY) benchmarks/bench_long_app.py
	$(PY) benchmarks/bench_dashboard.py
	$(PY) benchmarks/bench_browser.py
	$(PY) benchmarks/bench_sessions.py
	$(PY) benchmarks/bench_start.py
	$(PY) benchmarks/bench_export_bertviz.py
	# 0.9x the bare loop is met by a few percent: a slow hour can print FAIL (see the README)
	-$(PY) benchmarks/bench_corpus.py

# The default pages' templates the package ships: written again after a change to what shapes a page (a test says when).
templates: install
	$(PY) -c 'from attnflows_panel.export import ship_templates; print(*ship_templates(), sep="\n")'

clean:
	rm -rf $(VENV) .pytest_cache
