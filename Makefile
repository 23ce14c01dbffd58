# Every target that runs something first does the whole set-up on a fresh machine.
# torch is installed first and pinned: an open range would pull a multi-GB CUDA build.
# Set-up, the lock and the Python versions: docs/development.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
# The versions the suite was last green with (`make lock` writes it). `make test-latest` ignores it.
CONSTRAINTS ?= constraints.txt
# `make test BROWSER=0` never offers to install chromium.
BROWSER ?= 1
PYTEST := -m pytest -q -n 2 -p no:cacheprovider
LINTED := interpkv tests benchmarks scripts
LATEST := .venv-latest
# Python versions `make test-pythons` runs the demo and the unit tests on (pyenv names them).
PYTHONS ?= 3.11 3.12 3.13
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser demo test test-all test-tl4 test-latest lock test-pythons lint typecheck bench docs clean

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "interpkv needs Python >= 3.11; $(PYTHON) is older (make PYTHON=python3.11 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q $(PIP_FLAGS) -c $(CONSTRAINTS) -e ".[dev,docs]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for tests/integration/test_report_browser.py, which skips (and says why)
# without it: nothing else needs it. Offered only when missing, when we are root with apt and
# BROWSER=1; a failed install never fails the build.
browser:
	-@if [ "$(BROWSER)" = 1 ] && ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "chromium is missing: installing the Debian package chromium with apt-get for the optional report browser test"; \
		echo "(skip this with 'make test BROWSER=0'; without chromium that one test skips and the rest runs)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
			|| echo "chromium install failed: the report browser test will skip"; \
	fi

demo: install
	$(VENV)/bin/interpkv demo --html reports/interpkv-report.html

lint: install
	$(VENV)/bin/ruff check $(LINTED)

typecheck: install
	$(VENV)/bin/mypy

test: lint typecheck browser
	$(PY) $(PYTEST) -m "not slow"

test-all: lint typecheck browser
	$(PY) $(PYTEST)

# The newest versions setup.cfg's ranges allow (torch still pinned, see TORCH), in their own
# venv, so an upstream change shows up as a named test failure instead of a red CI on unrelated
# work. Runs the test suite only: lint and typecheck findings of newer ruff / mypy are not
# upstream behaviour changes. constraints.txt is not read (/dev/null) and not written.
test-latest:
	rm -f $(LATEST)/.installed
	$(MAKE) --no-print-directory install VENV=$(LATEST) CONSTRAINTS=/dev/null PIP_FLAGS="--upgrade --upgrade-strategy eager"
	$(LATEST)/bin/python $(PYTEST) -m "not slow"

# Refresh constraints.txt: resolve the newest allowed versions, run the suite on them
# (test-latest), and only if it passes, write what that venv holds as the new lock.
lock: test-latest
	@{ echo "# Exact versions the suite was last green with (make lock, $$(date -u +%F), Python $$($(LATEST)/bin/python -c 'import platform; print(platform.python_version())'), CPU torch)."; \
	   echo "# Used by every make target (pip install -c constraints.txt); see docs/development.md."; \
	   $(LATEST)/bin/python -m pip freeze --exclude-editable | grep -v '^interpkv' | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	@grep -iE '^(torch|transformer-lens|transformers|numpy|ruff|mypy|beartype|jaxtyping)==' constraints.txt

# The demo and the unit tests on each Python in PYTHONS (pyenv must have it), each in its own
# venv .venv-py<version> with the lock. torch 2.13.0's CPU wheel may exist only for one Python
# on a machine; for the others pip downloads torch from PyPI (a CUDA build, several GB each).
test-pythons:
	@mkdir -p reports; for v in $(PYTHONS); do \
		py=$$(pyenv prefix $$v 2>/dev/null)/bin/python; \
		[ -x "$$py" ] || { echo "pyenv has no Python $$v (pyenv install $$v)"; exit 1; }; \
		echo "== Python $$v ($$py)"; \
		$(MAKE) --no-print-directory install PYTHON=$$py VENV=.venv-py$$v || exit 1; \
		.venv-py$$v/bin/interpkv demo --html reports/interpkv-report-py$$v.html > reports/demo-py$$v.txt || { cat reports/demo-py$$v.txt; exit 1; }; \
		tail -1 reports/demo-py$$v.txt; \
		.venv-py$$v/bin/python $(PYTEST) tests/unit || exit 1; \
	done

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
	rm -rf $(VENV) $(VENV_TL4) $(LATEST) .venv-py3.* site reports .pytest_cache
