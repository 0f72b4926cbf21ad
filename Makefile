# mpo-fast: `make demo` runs the main job on its embedded default, `make test` runs the tests.
# Both set up what they need first (CPU torch 2.13 when no torch is installed).
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q --disable-pip-version-check
# the peers the benchmarks compare against (TRL's trainer needs datasets and pandas)
PEERS := liger-kernel trl datasets pandas cut-cross-entropy

.PHONY: setup peers test demo bench lint

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) "triton>=3.1; platform_system=='Linux'" pybind11 ninja tqdm matplotlib \
		pytest pytest-benchmark "transformers>=4.45" ruff
	$(PIP) --no-build-isolation -e .

peers: setup
	$(PIP) $(PEERS)

test: setup
	$(PYTHON) -m pytest -q

# The MPO loss head on its default shape, mpo-fast against the naive way and the peers.
demo: peers
	$(PYTHON) -m bench mpo --quick

bench: peers
	$(PYTHON) -m bench

lint:
	$(PYTHON) -m ruff check .
