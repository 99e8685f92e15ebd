// sm_90a grouped GEMM instantiation: d lhs, bf16, cooperative 128x256x64 tiles, 2x1 cluster.
#include "grouped_gemm_sm90.cuh"

JAX_MOE_SM90_DEFINE(dlhs_bf16_mcb, cutlass::bfloat16_t, jax_moe::GemmOp::kGradLhs, Coop128x256MulticastB)
