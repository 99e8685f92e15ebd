// sm_90a grouped GEMM instantiation: d rhs, f16, cooperative 128x256x64 tiles, 1x2 cluster.
#include "grouped_gemm_sm90.cuh"

JAX_MOE_SM90_DEFINE(drhs_f16_mca, cutlass::half_t, jax_moe::GemmOp::kGradRhs, Coop128x256MulticastA)
