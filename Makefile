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

.PHONY: venv demo test test-avx2 bench lint format clean

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

# The suite as an AVX2-only CPU (no AVX-512, no AMX) runs it, on any x86 machine: oneDNN, ATen and MKL are capped at
# AVX2, so oneDNN refuses bf16 exactly as on such a CPU. CI runs it without the slow tests.
AVX2_ONLY := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-avx2: venv
	$(AVX2_ONLY) $(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

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
