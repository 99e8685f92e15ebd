// Routing fused with the load-balancing aux loss (SPEC §2, route_with_aux_loss), per token row.
//
// Forward: besides the routing outputs, each row adds its clean scores to per-expert column sums
// and counts its top-aux_topk experts by clean score; the loss is C_coeff * Σ_e colsum_e * count_e,
// formed once all rows are in. Backward: the routing gradient plus the clean-score gradient of
// dscores_e = C_coeff * count_e * g (AuxCotangent), identical for every row, in the same pass.
#pragma once

#include "aux_loss_row.h"

namespace jax_moe {

struct AuxConfig {
  int64_t topk;
  ScoreFunction score_function;
};

// The backward's d scores C_coeff · g · counts[e] for the loss cotangent g, formed in the kernels (g is a buffer: on
// the device, in device memory) in the order of the XLA kernel they replace, (C_coeff · g) · counts[e].
struct AuxCotangent {
  const int32_t* counts;
  const float* dloss;
  float c_coeff;
  MOE_HD ScaledCounts scores() const { return ScaledCounts{Counts{counts, true}, c_coeff * *dloss}; }
};

// Expert e's term of the loss C_coeff · Σ_e colsum_e · counts_e (C_coeff inside the sum, as XLA formed it).
MOE_HD float aux_loss_term(float colsum, int32_t count, float c_coeff) { return colsum * (float(count) * c_coeff); }

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

// Fused backward of one row: routing gradient + clean-score gradient for d scores dscale(e) =
// dL/dscore_e, over a walk of the row (row_access.h: from memory, or a copy of it). x is the row in
// memory, read again only for the chosen experts' logits; known_aligned as in map_pieces.
template <class Lanes, class In, class Walk, class G>
MOE_HD void route_aux_bwd_of(const Lanes& L, const RouteConfig& c, ScoreFunction aux_f, const Walk& walk,
                             const typename In::storage* x, const int32_t* idx, const float* dw, const G& dscale,
                             typename In::storage* dx, bool known_aligned) {
  const CleanGrad cg = clean_grad_of(aux_f, row_sums_of(L, aux_f, walk, dscale));
  const RouteRowGrad<In> r = route_row_grad<Lanes, In>(L, c, x, idx, dw);
  map_pieces_weighted<In>(walk, dx, known_aligned, dscale, [&](const auto& xv, const auto& gv, auto& y) {
    cg.dx_piece(xv, gv, y);
#pragma unroll
    for (int j = 0; j < int(sizeof(y) / sizeof(float)); ++j) y[j] = r.base(xv[j]) + y[j];
  });
  L.sync();  // the chosen experts' values below overwrite the base values above
  for (int64_t j = L.lane; j < c.topk; j += L.nlanes)
    if (r.chosen_valid(j)) dx[idx[j]] = In::from_float(r.chosen(j) + cg.dx(r.logit(j), dscale(idx[j])));
}

// The same, reading the row from memory in both walks.
template <class Lanes, class In, class G>
MOE_HD void route_aux_bwd_row(const Lanes& L, const RouteConfig& c, ScoreFunction aux_f,
                              const typename In::storage* x, const int32_t* idx, const float* dw, const G& dscale,
                              typename In::storage* dx) {
  route_aux_bwd_of<Lanes, In>(L, c, aux_f, row_walk<Lanes, In>(L, x, c.num_experts), x, idx, dw, dscale, dx, false);
}

}  // namespace jax_moe
