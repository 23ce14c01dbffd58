# Every target that runs something first does the whole set-up on a fresh machine.
# torch is installed first and pinned: an open range would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
# The versions the suite was last green with; `make test-latest` ignores them.
CONSTRAINTS ?= constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser demo test test-all bench docs clean

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev,docs]"
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for tests/integration/test_report_browser.py. Installed only
# when missing and when we are root with apt; a failed install never fails the
# build (the browser test then skips and says why).
browser:
	-@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (apt) for the report browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
			|| echo "chromium install failed: the report browser test will skip"; \
	fi

demo: install
	$(VENV)/bin/interpkv demo --html reports/interpkv-report.html

test: install browser
	$(PY) -m pytest -q -m "not slow" -n 2 -p no:cacheprovider

test-all: install browser
	$(PY) -m pytest -q -n 2 -p no:cacheprovider

bench: install
	$(PY) benchmarks/run.py $(BENCH_ARGS)

docs: install
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) site reports .pytest_cache
