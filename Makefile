# mpo-fast: `make demo` runs the main job on its embedded default, `make test` runs the tests.
# Both set up what they need first (CPU torch 2.13 when no torch is installed).
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: setup test demo bench lint

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) "triton>=3.1; platform_system=='Linux'" pybind11 ninja tqdm matplotlib \
		pytest pytest-benchmark "transformers>=4.45" ruff
	$(PIP) --no-build-isolation -e .

test: setup
	$(PYTHON) -m pytest -q

demo: setup
	$(PYTHON) -m mpo_fast.cli demo

bench: setup
	$(PYTHON) -m bench

lint:
	$(PYTHON) -m ruff check .
