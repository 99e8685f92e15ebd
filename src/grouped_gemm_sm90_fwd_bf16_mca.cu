// sm_90a grouped GEMM instantiation: forward, bf16, cooperative 128x256x64 tiles, 1x2 cluster.
#include "grouped_gemm_sm90.cuh"

JAX_MOE_SM90_DEFINE(fwd_bf16_mca, cutlass::bfloat16_t, jax_moe::GemmOp::kForward, Coop128x256MulticastA)
