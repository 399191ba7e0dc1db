# make demo: train the tiny MoE end to end on the offline sample corpus (CPU, a few minutes).
# make test: lint and run the test suite.
# Both create .venv when missing and install the project into it: TORCH_SPEC first, then every
# other dependency at the exact version of the lock (requirements/lock.txt), then the project
# itself (--no-deps). `make test LOCK=` installs from pyproject.toml's ranges instead (in a fresh
# venv, e.g. VENV=/tmp/ranges, the newest releases they allow). TORCH_SPEC picks the torch build
# (the default is the CPU build these machines carry); for CUDA, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
# make lock: re-resolve the lock from pyproject.toml (see the target).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
LOCK_FILE := requirements/lock.txt
LOCK ?= $(LOCK_FILE)
BIN := $(VENV)/bin
# One stamp per install mode, so that switching between the lock and the ranges reinstalls.
INSTALLED := $(VENV)/.installed-$(if $(LOCK),locked,ranges)
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: demo test install lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(BIN)/python pyproject.toml $(LOCK)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
ifneq ($(LOCK),)
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
else
	$(BIN)/python -m pip install --quiet -e ".[dev]"
endif
	rm -f $(VENV)/.installed*
	touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(OFFLINE) $(BIN)/python train.py experiment=demo

test: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(OFFLINE) $(BIN)/python -m pytest -q

# The lock: every dependency of pyproject.toml and its dev extras at one exact version, resolved
# by uv from PyPI for Python 3.11+ on every platform (--universal: markers where they differ),
# each pin moved to the newest release the ranges allow (LOCK_UPGRADE= keeps the current pins
# that still fit, e.g. after adding a dependency). torch is pinned to the release TORCH_SPEC
# installs and resolved with its CPU wheel's requirements, so no CUDA package (nvidia-*,
# cuda-*, triton) enters the lock: why and how in requirements/lock.toml. No hashes: the torch
# wheel differs by machine (CPU here, a CUDA build elsewhere), so one hash cannot serve all.
LOCK_UPGRADE ?= --upgrade
lock: $(BIN)/python
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--config-file requirements/lock.toml $(LOCK_UPGRADE) \
		--custom-compile-command "make lock" --quiet -o $(LOCK_FILE)

clean:
	rm -rf $(VENV) .cache outputs
