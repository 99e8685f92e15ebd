// sm_90a grouped GEMM instantiation: forward, bf16 (tile config: OpConfig in grouped_gemm_sm90.cuh).
#include "grouped_gemm_sm90.cuh"

JAX_MOE_SM90_DEFINE(fwd_bf16, cutlass::bfloat16_t, jax_moe::GemmOp::kForward)
