#include "handlers.h"
#include "module.h"

NB_MODULE(_jax_moe_cpu, m) {
  using namespace jax_moe;
  define_module(m, {
                       {"jax_moe_route_fwd", jax_moe_route_fwd_cpu},
                       {"jax_moe_route_bwd", jax_moe_route_bwd_cpu},
                       {"jax_moe_route_aux_fwd", jax_moe_route_aux_fwd_cpu},
                       {"jax_moe_route_aux_bwd", jax_moe_route_aux_bwd_cpu},
                       {"jax_moe_aux_scores_fwd", jax_moe_aux_scores_fwd_cpu},
                       {"jax_moe_aux_scores_bwd", jax_moe_aux_scores_bwd_cpu},
                       {"jax_moe_aux_loss_fwd", jax_moe_aux_loss_fwd_cpu},
                       {"jax_moe_aux_loss_bwd", jax_moe_aux_loss_bwd_cpu},
                       {"jax_moe_aux_logits_fwd", jax_moe_aux_logits_fwd_cpu},
                       {"jax_moe_aux_logits_bwd", jax_moe_aux_logits_bwd_cpu},
                       {"jax_moe_permute_fwd", jax_moe_permute_fwd_cpu},
                       {"jax_moe_permute_bwd", jax_moe_permute_bwd_cpu},
                       {"jax_moe_unpermute_fwd", jax_moe_unpermute_fwd_cpu},
                       {"jax_moe_unpermute_bwd", jax_moe_unpermute_bwd_cpu},
                       {"jax_moe_gmm_fwd", jax_moe_gmm_fwd_cpu},
                       {"jax_moe_gmm_dlhs", jax_moe_gmm_dlhs_cpu},
                       {"jax_moe_gmm_drhs", jax_moe_gmm_drhs_cpu},
                   });
}
