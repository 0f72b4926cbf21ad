#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (bench/README.md says how to call it): install
# the carried peer wheels, build the C++/CUDA extension, run the test suite on CUDA, run the
# benchmarks, and leave everything under $OUT in at most 8 files (what the device tool brings
# back): suite.log, tests.log, build.log, results.tgz, and the three result tables.
#
#   bash bench/gpu_suite.sh            on the GPU machine (10-minute budget, steps time-boxed)
#   DRY_RUN=1 bash bench/gpu_suite.sh  here, on a CPU: same steps, CPU shapes, no wheels needed
#   FULL=1 bash bench/gpu_suite.sh     the whole DESIGN.md §6 grid instead of one shape/suite
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${DRY_RUN:-0}
OUT=${OUT:-$PWD/gpu_suite_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/suite.log" >&2; }
step() {  # step NAME SECONDS CMD...: time-boxed, logged, never aborts the suite
  local name=$1 secs=$2; shift 2
  log "start $name (limit ${secs}s)"
  local t0=$SECONDS
  timeout "$secs" "$@"
  local rc=$?
  log "end $name: exit $rc after $((SECONDS - t0))s"
  return $rc
}

log "host: $(hostname); python: $(python3 -c 'import sys; print(sys.version.split()[0])')"
python3 - <<'PY' 2>&1 | tee -a "$OUT/suite.log"
import torch, importlib
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
for m in ("triton", "transformers", "flash_attn"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "missing:", type(e).__name__)
PY

if [ "$DRY" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  log "no .whl/ installed (dry run, or none carried): missing peers show as skipped"
fi

# The editable install maps kernels/ to mpo_fast.kernels and builds mpo_fast._C (CUDA kernels
# when nvcc is there). No network: --no-deps, --no-build-isolation.
export MAX_JOBS=${MAX_JOBS:-16}
step build 300 python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1
python3 -c "import mpo_fast; print('packing backend:', mpo_fast.packing.backend())" \
  2>&1 | tee -a "$OUT/suite.log"

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  step tests 900 python3 -m pytest -q -m "not slow" -p no:cacheprovider >"$OUT/tests.log" 2>&1
else
  DEVICE=cuda
  PER_TEST=$(python3 -c "import pytest_timeout" 2>/dev/null && echo --timeout=120)
  step tests 240 python3 -m pytest -q -p no:cacheprovider $PER_TEST >"$OUT/tests.log" 2>&1
fi
tail -n 15 "$OUT/tests.log" | tee -a "$OUT/suite.log"

QUICK=--quick
[ "${FULL:-0}" = 1 ] && QUICK=
mkdir -p "$OUT/results"
for suite in mpo head packing; do
  step "bench-$suite" 300 python3 -m bench "$suite" --device "$DEVICE" $QUICK --out "$OUT/results" \
    >>"$OUT/suite.log" 2>&1
done
for table in mpo head packing; do
  [ -f "$OUT/results/$table.md" ] && cp "$OUT/results/$table.md" "$OUT/$table.md"
done
tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
log "done; files: $(ls "$OUT" | tr '\n' ' ')"
