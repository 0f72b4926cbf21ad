#!/usr/bin/env bash
# The prepared run for a lent GPU machine (bench/README.md says how to call it). Every step is
# time-boxed and logged, none aborts the suite, and results land in $OUT as they are made
# (at most 8 files: what the device tool brings back).
#
#   PARTS="cold probe tests" bash bench/gpu_suite.sh        first call (~5 min)
#   PARTS="scoreboard packing warm" bash bench/gpu_suite.sh second call (~4 min)
#   PARTS="train" bash bench/gpu_suite.sh                    one training step, ~0.5B (~3 min)
#   PARTS="modes" bash bench/gpu_suite.sh                    issue 21: every head mode vs Liger
#                                                            (< 8 min incl. Triton/compile warm-up)
#   DRY_RUN=1 bash bench/gpu_suite.sh                        here, on a CPU, toy shapes
#
# Parts, in the order they run: cold (first MPOLoss call on an empty Triton cache), probe (bench/gpu_probe.py: card
# rates, float64 checks, per-shape timings, config sweep, previous kernels), tests (the suite
# on CUDA), scoreboard (python -m bench mpo at the issue's two shapes, with the peers),
# packing (pack/unpack GB/s), warm (mpo_fast.warmup, then the first call), train (one MPO step
# of a Qwen2-0.5B-sized random-init Llama in bf16, packed+fused vs padded+naive).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${DRY_RUN:-0}
PARTS=${PARTS:-cold probe tests scoreboard packing warm}
OUT=${OUT:-$PWD/gpu_suite_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/suite.log" >&2; }
step() {  # step NAME SECONDS CMD...: time-boxed, logged, never aborts the suite
  local name=$1 secs=$2; shift 2
  log "start $name (limit ${secs}s)"
  local t0=$SECONDS
  timeout -k 5 "$secs" "$@"
  local rc=$?
  log "end $name: exit $rc after $((SECONDS - t0))s"
  return $rc
}
has() { [[ " $PARTS " == *" $1 "* ]]; }

log "parts: $PARTS; dry run: $DRY"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  PROBE=(--dry-run) DEVICE=cpu
else
  nvidia-smi -L 2>&1 | tee -a "$OUT/suite.log"
  PROBE=() DEVICE=cuda
fi
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
  2>&1 | tee -a "$OUT/suite.log"

if [ "$DRY" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 90 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

# mpo_fast/kernels is a committed symlink to kernels/ (docs/DESIGN.md §2); a copy of the tree
# that dropped the link gets it back, so the package imports before and without the editable
# install (which builds the C++/CUDA extension in the background).
[ -e mpo_fast/kernels ] || ln -s ../kernels mpo_fast/kernels
if has tests || has packing; then
  (MAX_JOBS=8 nice python3 -m pip install -q --no-deps --no-build-isolation -e . \
    >"$OUT/build.log" 2>&1; echo "build exit $?" >>"$OUT/build.log") &
  BUILD=$!
fi

if has cold; then  # an empty Triton cache: what a user's very first step costs
  TRITON_CACHE_DIR=$(mktemp -d) step cold 75 python3 -m bench.gpu_probe "${PROBE[@]}" \
    --parts cold --out "$OUT" 2>&1 | tee -a "$OUT/suite.log"
fi
if has scoreboard; then
  step scoreboard 200 python3 -m bench mpo --device "$DEVICE" --quick --out "$OUT/results" \
    >>"$OUT/suite.log" 2>&1
  [ -f "$OUT/results/mpo.md" ] && cp "$OUT/results/mpo.md" "$OUT/mpo.md" && cat "$OUT/mpo.md"
fi
if has probe; then
  step probe 170 python3 -m bench.gpu_probe "${PROBE[@]}" --quick --out "$OUT" \
    --parts "${PROBE_PARTS:-card,correctness,shapes,sweep,baseline}" 2>&1 | tee -a "$OUT/suite.log"
fi
if [ -n "${BUILD:-}" ]; then
  step build-wait 120 bash -c "while kill -0 $BUILD 2>/dev/null; do sleep 1; done"
  tail -n 3 "$OUT/build.log" | tee -a "$OUT/suite.log"
  python3 -c "import mpo_fast; print('packing backend:', mpo_fast.packing.backend())" \
    2>&1 | tee -a "$OUT/suite.log"
fi
if has tests; then
  MARK=(-m "not slow")
  TIMEOUT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo --timeout=90)
  # the sm_90 compile check is a CPU test (it runs in CI); here it would only cost time
  step tests 150 python3 -m pytest -q -p no:cacheprovider "${MARK[@]}" $TIMEOUT --durations=15 \
    --deselect tests/test_sm90_compile.py::test_kernels_compile_for_sm90 >"$OUT/tests.log" 2>&1
  tail -n 40 "$OUT/tests.log" | tee -a "$OUT/suite.log"
fi
if has packing; then
  step packing 60 python3 -m bench packing --device "$DEVICE" --quick --out "$OUT/results" \
    >>"$OUT/suite.log" 2>&1
fi
if has warm; then  # mpo_fast.warmup on an empty cache, then the first call
  TRITON_CACHE_DIR=$(mktemp -d) step warm 60 python3 -m bench.gpu_probe "${PROBE[@]}" \
    --parts warm --out "$OUT" 2>&1 | tee -a "$OUT/suite.log"
fi
if has modes; then  # issue 21: two-pass / single-pass / frozen head vs Liger (bench/modes.py)
  [ "$DRY" = 1 ] && MODES=(--dry-run --no-liger) || MODES=()
  step modes 470 python3 -m bench.modes "${MODES[@]}" --out "$OUT" \
    --json-out "$OUT/results" 2>&1 | tee -a "$OUT/suite.log"
fi
if has train; then  # issue 10's GPU number; the dry run is a toy shape on the CPU
  if [ "$DRY" = 1 ]; then SHAPE=(--vocab 2000 --hidden 64 --layers 2 --heads 4 --pairs 2)
  else SHAPE=(--vocab 151936 --hidden 896 --layers 24 --heads 14 --pairs 16); fi
  step train 240 python3 -m bench.train_step "${SHAPE[@]}" --dtype bf16 --repeats 3 \
    2>&1 | tee "$OUT/train.txt" | tee -a "$OUT/suite.log"
fi
if [ -d "$OUT/results" ]; then
  tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
fi
log "done; files: $(ls "$OUT" | tr '\n' ' ')"
