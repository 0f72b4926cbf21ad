#!/usr/bin/env bash
# Download the pure-Python peer wheels a lent GPU machine lacks into .whl/ (ignored by git),
# for the device tool's `carry`. Run here, in the repo root, before bench/gpu_suite.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
# The GPU image has torch, triton, transformers, accelerate, pandas, pyarrow, xxhash: only these
# are missing (trl needs datasets; datasets needs dill and multiprocess).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  liger-kernel==0.8.5 trl==1.16.0 cut-cross-entropy==25.1.1 datasets dill multiprocess
du -sh .whl && ls .whl
