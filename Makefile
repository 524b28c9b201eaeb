# The two commands a new user needs: `make run` and `make test`. Both build .venv on first use.
SHELL   := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
# Quiet pip, minus the local-index noise some machines print for every package.
PIP     := $(BIN)/pip install --disable-pip-version-check -q

.PHONY: setup run test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first: otherwise a dependency may pull a multi-GB CUDA build.
	$(PIP) $(TORCH) 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(PIP) -e '.[dev]' 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/python -c "import torch, transformers, prefect, deepspeed, pipeline" 
	touch $(STAMP)

run: setup
	$(BIN)/tunepipe run examples/quickstart.yaml

# Two workers: most heavy tests wait on subprocesses (torchrun, Prefect, Slurm), not on a core.
# A test file stays in one worker (its module fixtures are made once); `pytest -q` runs serially.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration and not slow"

clean:
	rm -rf runs registry .pytest_cache
