// Routing fused with the load-balancing aux loss (SPEC §2, route_with_aux_loss), per token row.
//
// Forward: besides the routing outputs, each row adds its clean scores to per-expert column sums
// and counts its top-aux_topk experts by clean score; the loss is C_coeff * Σ_e colsum_e * count_e,
// formed once all rows are in. Backward: the routing gradient plus the clean-score gradient of
// dscores_e = C_coeff * count_e * g, identical for every row, in the same pass.
#pragma once

#include "aux_loss_row.h"

namespace jax_moe {

struct AuxConfig {
  int64_t topk;
  ScoreFunction score_function;
};

// Adds one row's clean scores to colsum[e] and its top-k experts by clean score to counts[e].
// colsum entries are owned by the lanes that stride over them; counts are visited once per expert.
template <class Lanes, class In>
MOE_HD void aux_stats_row(const Lanes& L, const AuxConfig& a, const typename In::storage* x, int64_t E,
                          float* colsum, int32_t* counts) {
  const CleanStats st = clean_stats<Lanes, In>(L, a.score_function, x, E);
  for (int64_t e = L.lane; e < E; e += L.nlanes) colsum[e] += st.score(In::to_float(x[e]));
  for_each_topk(
      L, E, a.topk, [&](int64_t e) { return rank_key(st.score(In::to_float(x[e]))); },
      [&](int64_t e) { counts[e] += 1; });
  L.sync();
}

// Fused backward of one row: routing gradient + clean-score gradient for dscale[e] = dL/dscore_e.
template <class Lanes, class In>
MOE_HD void route_aux_bwd_row(const Lanes& L, const RouteConfig& c, ScoreFunction aux_f,
                              const typename In::storage* x, const int32_t* idx, const float* dw,
                              const float* dscale, typename In::storage* dx) {
  const CleanGrad cg = clean_grad<Lanes, In>(L, aux_f, x, c.num_experts, [&](int64_t e) { return dscale[e]; });
  route_bwd_row<Lanes, In>(L, c, x, idx, dw, dx, [&](int64_t e, float xe) { return cg.dx(xe, dscale[e]); });
}

}  // namespace jax_moe
