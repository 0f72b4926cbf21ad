"""Build mpo-fast: the Python package, its Triton kernels (as `mpo_fast.kernels`) and the
optional C++/CUDA extension `mpo_fast._C` from csrc/.

The extension gets CUDA kernels when torch was built with CUDA and nvcc is found, CPU kernels
otherwise. If it cannot be built at all, the install still succeeds and the package uses its
pure-torch fallbacks. Install with `pip install --no-build-isolation -e .` (an isolated build
would download a second torch). MPO_FAST_NO_EXTENSION=1 skips the extension.
"""

import glob
import os
import sys

from setuptools import setup


def extension_kwargs() -> dict:
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if os.environ.get("MPO_FAST_NO_EXTENSION") == "1" or not cpp:
        return {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError:
        print("mpo-fast: torch not importable at build time; skipping the extension",
              file=sys.stderr)
        return {}
    cuda = torch.version.cuda is not None and ce.CUDA_HOME is not None
    cu = sorted(glob.glob("csrc/*.cu")) if cuda else []
    cxx = ["-O3", "-std=c++17"] + (["-DMPO_FAST_WITH_CUDA"] if cu else [])
    # at::parallel_for is header-inline OpenMP: without -fopenmp the CPU kernels run serially.
    # libgomp.so.1 resolves to the copy torch has already loaded.
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx += omp
    if cu:
        ext = ce.CUDAExtension(
            "mpo_fast._C", cpp + cu,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-DMPO_FAST_WITH_CUDA"]},
            extra_link_args=omp,
        )
    else:
        ext = ce.CppExtension("mpo_fast._C", cpp, extra_compile_args={"cxx": cxx},
                              extra_link_args=omp)

    class OptionalBuildExt(ce.BuildExtension):
        """A failed extension build must not fail the install: the package has fallbacks."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # any compiler failure
                print(f"mpo-fast: extension build failed ({exc}); using the torch fallback",
                      file=sys.stderr)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}


setup(
    name="mpo-fast",
    version="0.1.0",
    description="Mixed Preference Optimization with fused, memory-lean log-prob kernels",
    python_requires=">=3.10",
    packages=["mpo_fast", "mpo_fast.kernels"],
    license="Apache-2.0",
    # Lower bounds are what the code needs; the versions last tested are in constraints.txt.
    # Upper bounds only for a known incompatibility, each with its reason.
    install_requires=["torch>=2.5"],
    extras_require={
        "triton": ["triton>=3.1"],
        # the trainer (mpo-fast train), the pair pipeline (mpo-fast pairs), the integrations
        "train": ["transformers>=4.45", "pyyaml", "safetensors", "tqdm", "pillow", "matplotlib"],
        # <2: FusedDPOTrainer overrides DPOTrainer's internal hooks (_compute_loss,
        # compute_ref_log_probs), which a major release is free to change; it refuses others
        "trl": ["trl>=1.15,<2"],
        # `kernels` is Hugging Face's distribution that transformers >= 5.25 imports: the
        # tests check that nothing in this repository shadows it
        "test": ["pytest>=8", "pytest-benchmark", "transformers>=4.45", "ruff", "trl>=1.15,<2",
                 "datasets", "peft", "pyyaml", "safetensors", "tqdm", "pillow", "matplotlib",
                 "kernels", "tensorboard", "wandb"],
        # the benchmarks: progress bar, plots, and the peers (TRL's trainer needs datasets, pandas)
        "bench": ["tqdm", "matplotlib", "liger-kernel", "trl>=1.15,<2", "datasets", "pandas",
                  "cut-cross-entropy"],
    },
    entry_points={"console_scripts": ["mpo-fast=mpo_fast.cli:main"]},
    **extension_kwargs(),
)
