# make demo: train the tiny MoE end to end on the offline sample corpus (CPU, a few minutes).
# make test: lint and run the test suite.
# Both create .venv when missing and install the project into it. TORCH_SPEC picks the torch
# build installed first (the default is the CPU build these machines carry); for CUDA, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(OFFLINE) $(BIN)/python train.py experiment=demo

test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(OFFLINE) $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .cache outputs
