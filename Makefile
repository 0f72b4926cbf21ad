# mpo-fast: `make demo` trains a bundled tiny model with MPO (CPU, ~1 minute) and shows what
# improved; `make test` runs the tests; `make bench` is the scoreboard against the peers.
# Both set up what they need first (CPU torch 2.13 when no torch is installed).
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q --disable-pip-version-check
# what the benchmarks need: the peers they compare against (TRL's trainer needs datasets and
# pandas), a progress bar and plots
BENCH_DEPS := liger-kernel trl==1.16.0 datasets pandas cut-cross-entropy tqdm matplotlib
# the integration tests compare against TRL 1.16 itself (and its PEFT reference path)
TEST_DEPS := "triton>=3.1; platform_system=='Linux'" pybind11 ninja pytest pytest-benchmark \
	"transformers>=4.45" ruff trl==1.16.0 datasets peft tqdm pyyaml safetensors pillow matplotlib

# `make setup` installs and builds only when something it depends on changed: the stamp is
# keyed on the extension's sources, setup.py, pyproject.toml and the interpreter, and is
# trusted only while this checkout's extension and kernels import (a new torch, a deleted .so
# or an install of another checkout all rebuild). `rm -rf build` forces a rebuild.
SETUP_KEY := $(shell { cat setup.py pyproject.toml csrc/*; echo "$(PYTHON)"; } 2>/dev/null \
	| sha256sum | cut -c1-16)
STAMP := build/setup-$(SETUP_KEY).stamp
CHECK_INSTALL := import os, importlib.util as u, mpo_fast._C, mpo_fast.kernels.configs as k; \
	assert os.path.realpath(k.__file__).startswith(os.path.realpath('kernels')), k.__file__; \
	assert all(u.find_spec(m) for m in ('pytest', 'transformers', 'trl', 'peft', 'yaml'))

.PHONY: setup install peers test test-slow demo bench lint

setup:
	@if [ -f $(STAMP) ] && $(PYTHON) -c "$(CHECK_INSTALL)" 2>/dev/null; then \
		echo "setup: up to date (nothing changed since $(STAMP))"; \
	else \
		$(MAKE) --no-print-directory install; \
	fi

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) $(TEST_DEPS)
	$(PIP) --no-build-isolation -e .
	@mkdir -p build && rm -f build/setup-*.stamp && touch $(STAMP)

peers: setup
	$(PIP) $(BENCH_DEPS)

# The whole suite within ~4 GB of RAM; the large-memory cases are `make test-slow`.
test: setup
	$(PYTHON) -m pytest -q -m "not slow"

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
