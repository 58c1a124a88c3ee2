# Two commands set everything up: `make demo` and `make test` create or refresh .venv, install seer, then run.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seer-installed
# torch/torchvision pinned to the releases the CPU machines carry; any CUDA or CPU build of these works.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv demo test test-all bench lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | { grep -v "is ignored" || true; }
	$(PY) -m pip install -q $(TORCH_PIN) 2>&1 | { grep -v "is ignored" || true; }
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | { grep -v "is ignored" || true; }
	$(PY) -c "import seer, torch, torchvision, webdataset, submitit, faiss, timm, transformers"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/seer demo

# CI runs everything but the GPU tests.
test: venv
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

bench: venv
	$(PY) -m benchmarks.run_all

lint: venv
	$(VENV)/bin/ruff check seer tests benchmarks launch eval
	$(VENV)/bin/ruff format --check seer tests benchmarks launch eval

format: venv
	$(VENV)/bin/ruff check --fix seer tests benchmarks launch eval
	$(VENV)/bin/ruff format seer tests benchmarks launch eval

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
