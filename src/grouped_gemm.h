// Grouped (ragged) matrix multiplication with jax.lax.ragged_dot semantics.
//
// Rows of group g are contiguous and in order; offsets are the exclusive prefix sums of the group
// sizes, where a negative size counts as 0 and offsets are clamped to M (a sum above M never reads
// or writes out of bounds). Operands are bf16/f16 (f32 accumulation, output in the operand dtype)
// or f32 (f32 accumulation). group_sizes stay on the device: the call never synchronises with the
// host, never allocates and enqueues everything on the given stream, so it is CUDA-graph capturable.
//
// This header is plain C++ (no CUDA device code) so that the FFI layer can be compiled by any
// host compiler.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace jax_moe {

enum class GemmOp : int {
  // out[M,N] = lhs_g [m_g,K] @ rhs[g] [K,N] for every group; rows >= sum(group_sizes) are zero.
  // a = lhs [M,K], b = rhs [G,K,N].
  kForward = 0,
  // out[M,K] = dout_g [m_g,N] @ rhs[g]^T [N,K]; rows >= sum are zero. a = dout [M,N], b = rhs [G,K,N].
  kGradLhs = 1,
  // out[G,K,N] = lhs_g^T [K,m_g] @ dout_g [m_g,N]; empty groups give zeros. a = lhs [M,K], b = dout [M,N].
  kGradRhs = 2,
};

enum class GemmDtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct GroupedGemmArgs {
  GemmOp op;
  GemmDtype dtype;
  const void* a;                // device pointers, dense row-major
  const void* b;
  const int32_t* group_sizes;   // [G], on the device
  void* out;
  int64_t M, K, N, G;           // see GemmOp
  void* workspace;              // device scratch given by the caller
  size_t workspace_bytes;
};

// Bytes of device workspace that grouped_gemm needs. Depends only on (op, dtype, shapes, sm_count)
// and never on the group sizes' values, so it can be queried at trace time. sm_count is the number
// of multiprocessors of the device that will run the call (<= 0 means "unknown": a size for a
// device of 132 SMs is returned; a call on a larger device then runs its persistent kernel on fewer
// SMs rather than fail). Host-only and cheap.
size_t grouped_gemm_workspace_bytes(GemmOp op, GemmDtype dtype, int64_t M, int64_t K, int64_t N,
                                    int64_t G, int sm_count);

// Validates the arguments and enqueues the computation on `stream` (on the current device).
// Returns cudaSuccess or an error code; never throws and never aborts.
cudaError_t grouped_gemm(const GroupedGemmArgs& args, cudaStream_t stream);

}  // namespace jax_moe
