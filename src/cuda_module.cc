#include <cuda_runtime.h>

#include "grouped_gemm.h"
#include "handlers.h"
#include "module.h"

NB_MODULE(_jax_moe_cuda, m) {
  using namespace jax_moe;
  define_module(m, {
                       {"jax_moe_route_fwd", jax_moe_route_fwd_cuda},
                       {"jax_moe_route_bwd", jax_moe_route_bwd_cuda},
                       {"jax_moe_route_aux_fwd", jax_moe_route_aux_fwd_cuda},
                       {"jax_moe_route_aux_bwd", jax_moe_route_aux_bwd_cuda},
                       {"jax_moe_aux_scores_fwd", jax_moe_aux_scores_fwd_cuda},
                       {"jax_moe_aux_scores_bwd", jax_moe_aux_scores_bwd_cuda},
                       {"jax_moe_aux_loss_fwd", jax_moe_aux_loss_fwd_cuda},
                       {"jax_moe_aux_loss_bwd", jax_moe_aux_loss_bwd_cuda},
                       {"jax_moe_aux_logits_fwd", jax_moe_aux_logits_fwd_cuda},
                       {"jax_moe_aux_logits_bwd", jax_moe_aux_logits_bwd_cuda},
                       {"jax_moe_permute_fwd", jax_moe_permute_fwd_cuda},
                       {"jax_moe_permute_bwd", jax_moe_permute_bwd_cuda},
                       {"jax_moe_unpermute_fwd", jax_moe_unpermute_fwd_cuda},
                       {"jax_moe_unpermute_bwd", jax_moe_unpermute_bwd_cuda},
                       {"jax_moe_gmm_fwd", jax_moe_gmm_fwd_cuda},
                       {"jax_moe_gmm_dlhs", jax_moe_gmm_dlhs_cuda},
                       {"jax_moe_gmm_drhs", jax_moe_gmm_drhs_cuda},
                   });

  // Bytes of grouped matmul workspace for a call on the current device, queried at trace time
  // (op: GemmOp, dtype: GemmDtype of grouped_gemm.h). Without a usable device the size assumes
  // the default SM count (grouped_gemm_workspace_bytes with sm_count 0).
  m.def("gmm_workspace_bytes", [](int op, int dtype, int64_t M, int64_t K, int64_t N, int64_t G) {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();  // clear the (non-sticky) error for later CUDA calls
      sms = 0;
    }
    return grouped_gemm_workspace_bytes(GemmOp(op), GemmDtype(dtype), M, K, N, G, sms);
  });
}
