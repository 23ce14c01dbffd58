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

.PHONY: install browser demo test test-all test-tl4 bench docs clean

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

# TransformerLens 4 in its own venv: the tests under tests/tl4 (marker tl4; `make test` runs
# them on TransformerLens 3 too). Same pins as constraints.txt but transformer-lens; the package
# is installed as a user next to TL 4 would (`pip install -e ".[tl4]"`), and the target fails if
# that moved transformer-lens off 4.x.
VENV_TL4 := .venv-tl4
TL4 := transformer-lens==4.3.0
$(VENV_TL4)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV_TL4)
	$(VENV_TL4)/bin/python -m pip install -q --upgrade pip
	$(VENV_TL4)/bin/python -m pip install -q $(TORCH)
	grep -vi '^transformer-lens==' $(CONSTRAINTS) > $(VENV_TL4)/constraints.txt
	echo '$(TL4)' >> $(VENV_TL4)/constraints.txt
	$(VENV_TL4)/bin/python -m pip install -q -c $(VENV_TL4)/constraints.txt "$(TL4)"
	$(VENV_TL4)/bin/python -m pip install -q -c $(VENV_TL4)/constraints.txt -e ".[tl4]" pytest pytest-xdist hypothesis
	$(VENV_TL4)/bin/python -c "import importlib.metadata as m; v = m.version('transformer-lens'); assert v.startswith('4.'), v"
	touch $@

test-tl4: $(VENV_TL4)/.installed
	$(VENV_TL4)/bin/python -m pytest -q -m tl4 -n 2 -p no:cacheprovider tests/tl4

bench: install
	$(PY) benchmarks/run.py $(BENCH_ARGS)

docs: install
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) $(VENV_TL4) site reports .pytest_cache
