# mpo-fast: `make demo` trains a bundled tiny model with MPO (CPU, ~1 minute) and shows what
# improved; `make test` runs the tests; `make bench` is the scoreboard against the peers.
# Both set up what they need first, into the Python that runs make (use a virtual environment).
PYTHON ?= python3
# The tested versions (constraints.txt); `make test-latest` empties it to test the newest.
CONSTRAINTS ?= constraints.txt
PIP := $(PYTHON) -m pip install -q --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# Where no torch is installed: the tested CPU build (a plain `torch` pulls a multi-GB CUDA
# build) and, beside it, the Triton whose interpreter runs the kernel tests on the CPU. A CUDA
# torch brings its own Triton.
TORCH_CPU ?= torch==2.13.0
TRITON_CPU ?= triton==3.9.0
# The build needs these in the environment itself (--no-build-isolation: an isolated build
# would download a second torch); Python >= 3.12 venvs come without setuptools.
BUILD_DEPS := "setuptools>=64" wheel pybind11 ninja

# `make setup` installs and builds only when something it depends on changed: the stamp is
# keyed on the extension's sources, setup.py, pyproject.toml and the interpreter, and is
# trusted only while this checkout's extension and kernels import (a new torch, a deleted .so
# or an install of another checkout all rebuild). `rm -rf build` forces a rebuild.
SETUP_KEY := $(shell { cat setup.py pyproject.toml $(CONSTRAINTS) csrc/*; echo "$(PYTHON)"; } \
	2>/dev/null \
	| sha256sum | cut -c1-16)
STAMP := build/setup-$(SETUP_KEY).stamp
CHECK_INSTALL := import os, importlib.util as u, mpo_fast._C, mpo_fast.kernels.configs as k; \
	assert os.path.realpath(k.__file__).startswith(os.path.realpath('kernels')), k.__file__; \
	assert all(u.find_spec(m) for m in ('pytest', 'transformers', 'trl', 'peft', 'yaml'))

.PHONY: setup install peers test test-slow test-latest constraints demo bench lint

setup:
	@if [ -f $(STAMP) ] && $(PYTHON) -c "$(CHECK_INSTALL)" 2>/dev/null; then \
		echo "setup: up to date (nothing changed since $(STAMP))"; \
	else \
		$(MAKE) --no-print-directory install; \
	fi

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) $(TORCH_CPU)
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PIP) $(TRITON_CPU)
	$(PIP) $(BUILD_DEPS)
	$(PIP) --no-build-isolation -e ".[test]"
	@mkdir -p build && touch $(STAMP)

peers: setup
	$(PIP) --no-build-isolation -e ".[bench]"

# The whole suite within ~4 GB of RAM; the large-memory cases are `make test-slow`.
test: setup
	$(PYTHON) -m pytest -q -m "not slow"

# The newest releases pip resolves, in a new virtual environment (build/venv-latest), then the
# suite: a dependency that moved shows here, on purpose, instead of on a user's first run.
test-latest:
	rm -rf build/venv-latest && $(PYTHON) -m venv build/venv-latest
	$(MAKE) --no-print-directory test PYTHON=build/venv-latest/bin/python CONSTRAINTS= \
		TRITON_CPU=triton
	build/venv-latest/bin/python -m mpo_fast info

# Pin what the current environment has (after a green `make test-latest`, run it with
# PYTHON=build/venv-latest/bin/python): constraints.txt keeps its header.
constraints:
	{ sed -n '/^#/p' constraints.txt; $(PYTHON) -m pip freeze --exclude-editable \
		| grep -viE '^(torch|triton|mpo-fast|mpo_fast)==' ; } > constraints.new
	mv constraints.new constraints.txt

# Cases that need ~10 GB of free RAM (e.g. V*H > 2^31 weights); skipped when it is not there.
# pytest's exit code 5 (no test has the marker) is not a failure here.
test-slow: setup
	$(PYTHON) -m pytest -q -m slow || [ $$? -eq 5 ]

# The main job on its embedded default: `mpo-fast train` with no flags trains the bundled tiny
# model on the bundled task (SFT warm-up, then MPO), prints before/after accuracy and the loss
# head against full logits. Writes to ./runs/<date-time>/ (ignored by git) and says so.
demo: setup
	$(PYTHON) -m mpo_fast train

# The scoreboard: the MPO loss head against the naive way and the peers, at real vocabularies.
# Writes to ./runs/<device>-<date>/ (ignored by git).
bench: peers
	$(PYTHON) -m bench all

lint:
	$(PYTHON) -m ruff check .
