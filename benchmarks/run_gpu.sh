#!/bin/bash
# Build jax_moe and run its benchmarks on the GPU machine, from the repo root:
#   JAX_MOE_COMMIT=<short hash> bash benchmarks/run_gpu.sh [BENCH ...]
# BENCH: routing aux_loss grouped_matmul permute moe_layer (default: all five; the
# device tool allows 600 s a command, so pass a subset when the build is slow), or
# ep_scaling (every GPU of the machine: name it explicitly).
# Logs go to $OUT/<bench>.log, reports to $OUT/<bench>.md (append those to
# benchmarks/RESULTS.md: the copy written there does not come back), machine
# and versions to $OUT/env.txt, the build log to $OUT/build.log.
# The machine has no network. Wheels carried in .whl/ (tokamax and its
# dependencies, or build dependencies) are installed into /tmp/site first.
# Per-benchmark time limits: BENCH_TIMEOUT (seconds) overrides them all.
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/jax_moe_bench}
export OUT PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
[ -n "$JAX_MOE_CUTLASS_DIR" ] && export JAX_MOE_CUTLASS_DIR
[ -n "$JAX_MOE_COMMIT" ] && export JAX_MOE_COMMIT
mkdir -p "$OUT"

declare -A LIMIT=([routing]=300 [aux_loss]=300 [grouped_matmul]=360
                  [permute]=120 [moe_layer]=480 [ep_scaling]=300)
benches=("$@")
[ ${#benches[@]} -eq 0 ] && benches=(routing aux_loss grouped_matmul permute moe_layer)
for b in "${benches[@]}"; do
  [ -n "${LIMIT[$b]}" ] || { echo "unknown benchmark '$b'"; exit 2; }
done

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  nvcc --version | tail -1
  python3 --version
  python3 -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda|tokamax|numpy|scikit-build-core|nanobind) "
} 2>&1 | tee "$OUT/env.txt"

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

echo "=== build (JAX_MOE_CUTLASS_DIR=${JAX_MOE_CUTLASS_DIR:-unset})"
python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | tee "$OUT/build.log" \
  || { echo "BUILD FAILED: see $OUT/build.log"; exit 1; }
# from /tmp: in the repo root, "import jax_moe" would find the source tree
(cd /tmp && python3 -c "import jax_moe, jax; print('jax_moe from', jax_moe.__file__, '| jax', jax.__version__, jax.devices())") \
  2>&1 | tee -a "$OUT/env.txt"

status=0
for b in "${benches[@]}"; do
  echo "=== $b (limit ${BENCH_TIMEOUT:-${LIMIT[$b]}} s)"
  timeout "${BENCH_TIMEOUT:-${LIMIT[$b]}}" python3 "benchmarks/$b.py" 2>&1 | tee "$OUT/$b.log"
  rc=$?
  [ $rc -ne 0 ] && { echo "=== $b exited $rc"; status=1; }
done
exit $status
