# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Torch is installed first, pinned, so pip never pulls a multi-GB CUDA build on a CPU box.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/posttrain: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

.PHONY: install demo test lint
install: $(BIN)/posttrain

demo: install
	$(BIN)/posttrain demo

test: install
	$(BIN)/ruff check posttrain tests benchmarks evidence
	$(BIN)/ruff format --check posttrain tests benchmarks evidence
	OMP_NUM_THREADS=1 $(BIN)/pytest

lint: install
	$(BIN)/ruff check --fix posttrain tests benchmarks evidence
	$(BIN)/ruff format posttrain tests benchmarks evidence
