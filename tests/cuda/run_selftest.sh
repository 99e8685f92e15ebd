#!/usr/bin/env bash
# Builds tests/cuda/grouped_gemm_selftest.cu with the grouped GEMM sources and runs it on the
# current GPU. Usage:
#   JAX_MOE_CUTLASS_DIR=<folder with include/ and tools/util/include/> tests/cuda/run_selftest.sh [--no-bench]
# Without JAX_MOE_CUTLASS_DIR only the generic kernels are built (the sm_90a cases are skipped).
# Env: NVCC (default nvcc), JOBS (parallel compiles, default nproc), BUILD_DIR.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD_DIR:-$ROOT/build/gemm_selftest}
NVCC=${NVCC:-nvcc}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$BUILD"

FLAGS="-std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -I$ROOT/src"
GENERIC_ARCH="-gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_80,code=sm_80"
SM90_ARCH="-gencode=arch=compute_90a,code=sm_90a"

# Dense cuBLAS reference timing, when cuBLAS can be found (CUDA toolkit or the nvidia-cublas wheel).
LINK_EXTRA=()
CUBLAS_INC=""
for dir in "$(dirname "$(command -v "$NVCC")")/.." \
           "$(python3 -c 'import nvidia.cublas as c; print(list(c.__path__)[0])' 2>/dev/null || true)"; do
  [ -n "$dir" ] && [ -f "$dir/include/cublas_v2.h" ] || continue
  lib=$(ls "$dir"/lib*/libcublas.so* 2>/dev/null | head -n 1 || true)
  [ -n "$lib" ] || continue
  CUBLAS_INC="-DSELFTEST_CUBLAS -I$dir/include"
  LINK_EXTRA=("$lib" "-Xlinker" "-rpath=$(dirname "$lib")")
  break
done

# One line per translation unit: "<arch flags>|<extra flags>|<source>".
UNITS=()
DISPATCH_FLAGS=""
CUTLASS=${JAX_MOE_CUTLASS_DIR:-}
if [ -n "$CUTLASS" ]; then
  CUTLASS=$(cd "$CUTLASS" && pwd)
  CUTLASS_INC="-I$CUTLASS/include -I$CUTLASS/tools/util/include"
  DISPATCH_FLAGS="-DJAX_MOE_HAS_SM90_GEMM"
  for f in "$ROOT"/src/grouped_gemm_sm90_*.cu; do
    UNITS+=("$SM90_ARCH|$CUTLASS_INC|$f")
  done
fi
UNITS+=("$GENERIC_ARCH|$DISPATCH_FLAGS|$ROOT/src/grouped_gemm.cu")
UNITS+=("$GENERIC_ARCH||$ROOT/src/grouped_gemm_generic.cu")
UNITS+=("$GENERIC_ARCH|$CUBLAS_INC|$ROOT/tests/cuda/grouped_gemm_selftest.cu")

compile() {
  IFS='|' read -r arch extra src <<<"$1"
  obj="$BUILD/$(basename "${src%.cu}").o"
  start=$(date +%s)
  # shellcheck disable=SC2086
  if ! $NVCC $FLAGS $arch $extra -c "$src" -o "$obj" >"$obj.log" 2>&1; then
    echo "COMPILE FAILED: $src"; cat "$obj.log"; return 1
  fi
  echo "compiled $(basename "$src") in $(( $(date +%s) - start )) s"
  [ -s "$obj.log" ] && cat "$obj.log"
  return 0
}
export -f compile
export NVCC FLAGS BUILD

printf '%s\n' "${UNITS[@]}" | xargs -P "$JOBS" -I{} bash -c 'compile "$1"' _ {}

OBJS=()
for u in "${UNITS[@]}"; do
  src=${u##*|}
  OBJS+=("$BUILD/$(basename "${src%.cu}").o")
done
$NVCC -o "$BUILD/grouped_gemm_selftest" "${OBJS[@]}" "${LINK_EXTRA[@]}"
"$BUILD/grouped_gemm_selftest" "$@"
