// Internal interface between the grouped GEMM dispatcher (grouped_gemm.cu), its implementations
// (grouped_gemm_generic.cu, grouped_gemm_sm90_*.cu) and the CUDA self-test. Host-only C++.
//
// Workspace layout shared by every implementation (from the workspace pointer aligned up to
// kWorkspaceAlign; grouped_gemm_workspace_bytes reserves that slack):
//   [ int64 offsets[G+1] | int32 empty_groups[G+1] | implementation scratch ]
// offsets[g] is the clamped start row of group g and offsets[G] the number of rows that belong to a
// group; empty_groups[0] is the number of groups with no rows and empty_groups[1..] their indices.
// Each implementation fills these tables with its prep kernel (group_prep_kernel); the dispatcher
// then zeroes what no group writes (rows >= offsets[G], or the d rhs slices of empty groups).
#pragma once

#include <cstddef>
#include <cstdint>

#include "grouped_gemm.h"

namespace jax_moe::detail {

constexpr size_t kWorkspaceAlign = 256;

constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Device tables that every implementation's prep kernel fills (see the layout above).
struct GroupTables {
  int64_t* offsets;       // [G+1]
  int32_t* empty_groups;  // [G+1]; only filled for kGradRhs (nullptr otherwise)
};

inline size_t group_tables_bytes(int64_t G) {
  const size_t n = static_cast<size_t>(G + 1);
  return align_up(sizeof(int64_t) * n, kWorkspaceAlign) +
         align_up(sizeof(int32_t) * n, kWorkspaceAlign);
}

// Which implementation runs a call. kAuto is what grouped_gemm uses; the others exist so that the
// self-test can check and time each implementation on the same device.
enum class GemmImpl : int {
  kAuto = 0,
  kGeneric = 1,  // SIMT shared-memory kernel, any arch, any dtype
  kSm90 = 2,     // sm_90a CUTLASS, cooperative 128x256x64 tiles (OpConfig in grouped_gemm_sm90.cuh)
};

// Like grouped_gemm, but runs `impl`; cudaErrorNotSupported when that implementation cannot run
// this call on the current device.
cudaError_t grouped_gemm_impl(const GroupedGemmArgs& args, GemmImpl impl, cudaStream_t stream);

// --- generic implementation (grouped_gemm_generic.cu) ---
size_t generic_scratch_bytes(GemmOp op, int64_t G);
// Fills the group tables and computes every group's rows / d rhs slice; writes nothing else.
cudaError_t generic_run(const GroupedGemmArgs& args, GroupTables tables, char* scratch,
                        cudaStream_t stream);

// --- sm_90a CUTLASS implementations (grouped_gemm_sm90_<op>_<dtype>.cu), one pair per TU ---
// scratch_bytes: bytes after the group tables, for `sm_count` persistent CTAs.
// run: same contract as generic_run; requires 16-bit dtype, K % 8 == 0, N % 8 == 0 and M, K, N
// below 2^31, and returns cudaErrorNotSupported if CUTLASS rejects the problem.
struct Sm90Kernel {
  size_t (*scratch_bytes)(int64_t G, int sm_count);
  cudaError_t (*run)(const GroupedGemmArgs& args, GroupTables tables, char* scratch, int sm_count,
                     cudaStream_t stream);
};

#define JAX_MOE_SM90_DECLARE(NAME)                                                            \
  size_t sm90_scratch_bytes_##NAME(int64_t G, int sm_count);                                  \
  cudaError_t sm90_run_##NAME(const GroupedGemmArgs& args, GroupTables tables, char* scratch, \
                              int sm_count, cudaStream_t stream);
JAX_MOE_SM90_DECLARE(fwd_bf16)
JAX_MOE_SM90_DECLARE(fwd_f16)
JAX_MOE_SM90_DECLARE(dlhs_bf16)
JAX_MOE_SM90_DECLARE(dlhs_f16)
JAX_MOE_SM90_DECLARE(drhs_bf16)
JAX_MOE_SM90_DECLARE(drhs_f16)

#undef JAX_MOE_SM90_DECLARE

}  // namespace jax_moe::detail
