// CPU handlers of the routing primitives: the shared row algorithms, one lane, row after row.
#include <cstring>
#include <vector>

#include "ffi_helpers.h"
#include "handlers.h"
#include "route_aux_row.h"

namespace jax_moe {
namespace {

// Routes every row; after each, visit_row(t, row pointer) (the fused aux statistics).
template <class VisitRow>
ffi::Error route_rows(const void* logits, const RouteFwdBuffers& b, VisitRow visit_row) {
  const RouteConfig& c = b.config;
  std::vector<uint32_t> key(c.num_experts), gkey(c.num_groups);
  std::vector<float> val(c.num_experts);
  const RouteScratch scratch{key.data(), val.data(), gkey.data()};
  return dispatch_float(b.logits_dtype, [&]<class In>() {
    const auto* x = static_cast<const typename In::storage*>(logits);
    for (int64_t t = 0; t < b.tokens; ++t) {
      const auto* row = x + t * c.num_experts;
      route_row<SerialLanes, In>(SerialLanes{}, c, row, b.bias, scratch, b.weights + t * c.topk,
                                 b.indices + t * c.topk);
      visit_row.template operator()<In>(row);
    }
    return ffi::Error::Success();
  });
}

ffi::Error route_fwd(ffi::AnyBuffer logits, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> weights,
                     ffi::Result<ffi::AnyBuffer> indices, int64_t topk, int64_t score_function, bool pre,
                     int64_t num_groups, int64_t group_topk, int64_t group_score_topn, bool renormalize,
                     float scaling_factor) {
  auto checked = check_route_fwd(logits, bias, *weights, *indices,
                                 make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                   group_score_topn, renormalize, scaling_factor));
  if (checked.has_error()) return checked.error();
  return route_rows(logits.untyped_data(), *checked, []<class In>(const typename In::storage*) {});
}

// Rows are added in token order: deterministic. The workspaces serve the CUDA kernels only.
ffi::Error route_aux_fwd(ffi::AnyBuffer logits, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> weights,
                         ffi::Result<ffi::AnyBuffer> indices, ffi::Result<ffi::AnyBuffer> colsum,
                         ffi::Result<ffi::AnyBuffer> counts, ffi::Result<ffi::AnyBuffer> loss,
                         ffi::Result<ffi::AnyBuffer> ws_colsum, ffi::Result<ffi::AnyBuffer> ws_counts, int64_t topk,
                         int64_t score_function, bool pre, int64_t num_groups, int64_t group_topk,
                         int64_t group_score_topn, bool renormalize, float scaling_factor, int64_t aux_topk,
                         int64_t aux_score_function, float c_coeff) {
  auto checked = check_route_fwd(logits, bias, *weights, *indices,
                                 make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                   group_score_topn, renormalize, scaling_factor));
  if (checked.has_error()) return checked.error();
  const int64_t E = checked->config.num_experts;
  auto aux_checked =
      check_route_aux_outputs(E, aux_topk, aux_score_function, *colsum, *counts, *loss, *ws_colsum, *ws_counts);
  if (aux_checked.has_error()) return aux_checked.error();
  float* cs = colsum->typed_data<float>();
  int32_t* cn = counts->typed_data<int32_t>();
  std::memset(cs, 0, E * sizeof(float));
  std::memset(cn, 0, E * sizeof(int32_t));
  const AuxConfig aux{aux_topk, ScoreFunction(aux_score_function)};
  const ffi::Error routed = route_rows(logits.untyped_data(), *checked, [&]<class In>(const typename In::storage* row) {
    aux_stats_row<SerialLanes, In>(SerialLanes{}, aux, row, E, cs, cn);
  });
  if (routed.failure()) return routed;
  double total = 0.0;
  for (int64_t e = 0; e < E; ++e) total += aux_loss_term(cs[e], cn[e], c_coeff);
  *loss->typed_data<float>() = float(total);
  return ffi::Error::Success();
}

// Runs the backward row by row; row_bwd(lanes, row offset, topk offset) does one row.
template <class RowBwd>
ffi::Error route_bwd_rows(const RouteBwdBuffers& b, RowBwd row_bwd) {
  return dispatch_float(b.logits_dtype, [&]<class In>() {
    using S = typename In::storage;
    const auto* x = static_cast<const S*>(b.logits);
    auto* dx = static_cast<S*>(b.dlogits);
    const int64_t E = b.config.num_experts, k = b.config.topk;
    for (int64_t t = 0; t < b.tokens; ++t)
      row_bwd.template operator()<In>(x + t * E, b.indices + t * k, b.dweights + t * k, dx + t * E);
    return ffi::Error::Success();
  });
}

ffi::Error route_bwd(ffi::AnyBuffer logits, ffi::AnyBuffer indices, ffi::AnyBuffer dweights,
                     ffi::Result<ffi::AnyBuffer> dlogits, int64_t topk, int64_t score_function, bool pre,
                     int64_t num_groups, int64_t group_topk, int64_t group_score_topn, bool renormalize,
                     float scaling_factor) {
  auto checked = check_route_bwd(logits, indices, dweights, *dlogits,
                                 make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                   group_score_topn, renormalize, scaling_factor));
  if (checked.has_error()) return checked.error();
  const RouteConfig c = checked->config;
  return route_bwd_rows(*checked, [&]<class In>(const auto* x, const int32_t* idx, const float* dw, auto* dx) {
    route_bwd_row<SerialLanes, In>(SerialLanes{}, c, x, idx, dw, dx);
  });
}

ffi::Error route_aux_bwd(ffi::AnyBuffer logits, ffi::AnyBuffer indices, ffi::AnyBuffer dweights,
                         ffi::AnyBuffer counts, ffi::AnyBuffer dloss, ffi::Result<ffi::AnyBuffer> dlogits, int64_t topk,
                         int64_t score_function, bool pre, int64_t num_groups, int64_t group_topk,
                         int64_t group_score_topn, bool renormalize, float scaling_factor,
                         int64_t aux_score_function, float c_coeff) {
  auto checked = check_route_bwd(logits, indices, dweights, *dlogits,
                                 make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                   group_score_topn, renormalize, scaling_factor));
  if (checked.has_error()) return checked.error();
  if (auto err = check_aux_cotangent(checked->config.num_experts, aux_score_function, counts, dloss)) return *err;
  const RouteConfig c = checked->config;
  const ScaledCounts ds = AuxCotangent{counts.typed_data<int32_t>(), dloss.typed_data<float>(), c_coeff}.scores();
  const ScoreFunction aux_f = ScoreFunction(aux_score_function);
  return route_bwd_rows(*checked, [&]<class In>(const auto* x, const int32_t* idx, const float* dw, auto* dx) {
    route_aux_bwd_row<SerialLanes, In>(SerialLanes{}, c, aux_f, x, idx, dw, ds, dx);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_fwd_cpu, route_fwd,
                              bind_route_attrs(ffi::Ffi::Bind()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_bwd_cpu, route_bwd,
                              bind_route_attrs(ffi::Ffi::Bind()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_aux_fwd_cpu, route_aux_fwd,
                              bind_route_attrs(ffi::Ffi::Bind()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>())
                                  .Attr<int64_t>("aux_topk")
                                  .Attr<int64_t>("aux_score_function")
                                  .Attr<float>("c_coeff"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_aux_bwd_cpu, route_aux_bwd,
                              bind_route_attrs(ffi::Ffi::Bind()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>())
                                  .Attr<int64_t>("aux_score_function")
                                  .Attr<float>("c_coeff"));

}  // namespace jax_moe
