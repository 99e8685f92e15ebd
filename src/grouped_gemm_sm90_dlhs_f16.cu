// sm_90a grouped GEMM instantiation: d lhs, f16 (tile config: OpConfig in grouped_gemm_sm90.cuh).
#include "grouped_gemm_sm90.cuh"

JAX_MOE_SM90_DEFINE(dlhs_f16, cutlass::half_t, jax_moe::GemmOp::kGradLhs)
