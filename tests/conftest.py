"""Test set-up: without a GPU, the Triton kernels run on the CPU through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection.

Memory: the default run (`make test`, `-m "not slow"`) stays under ~4 GB of RAM. Tests marked
`slow` may need up to SLOW_TEST_GIB of free RAM (a V * H > 2^31 LM head is 4 GiB in bf16
before any gradient); `make test-slow` runs them, and they are skipped, with the reason, on a
machine whose available memory is smaller.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

SLOW_TEST_GIB = 10
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run; the seed is printed on failure for reproduction."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed = {seed}")  # shown with the captured output of a failing test
    yield seed


def available_gib() -> float | None:
    """MemAvailable from /proc/meminfo in GiB (None where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return kib / 2**20


def pytest_collection_modifyitems(config, items):
    slow = [item for item in items if item.get_closest_marker("slow")]
    free = available_gib()
    if slow and free is not None and free < SLOW_TEST_GIB:
        skip = pytest.mark.skip(reason=f"needs {SLOW_TEST_GIB} GiB of free RAM, "
                                       f"{free:.1f} GiB available")
        for item in slow:
            item.add_marker(skip)
