// CPU handlers of the routing primitives: the shared row algorithms, one lane, row after row.
#include <vector>

#include "ffi_helpers.h"
#include "handlers.h"
#include "routing_row.h"

namespace jax_moe {
namespace {

struct SerialLanes {
  static constexpr int lane = 0, nlanes = 1;
  bool leader() const { return true; }
  void sync() const {}
  float max(float v) const { return v; }
  float sum(float v) const { return v; }
  Cand best(Cand c) const { return c; }
};

ffi::Error route_fwd(ffi::AnyBuffer logits, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> weights,
                     ffi::Result<ffi::AnyBuffer> indices, int64_t topk, int64_t score_function, bool pre,
                     int64_t num_groups, int64_t group_topk, int64_t group_score_topn, bool renormalize,
                     float scaling_factor) {
  const RouteConfig requested = make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                  group_score_topn, renormalize, scaling_factor);
  auto shapes = check_route_buffers(logits, weights->dimensions(), requested);
  if (shapes.has_error()) return shapes.error();
  const RouteConfig c = shapes->config;
  if (weights->element_type() != ffi::DataType::F32 || indices->element_type() != ffi::DataType::S32 ||
      indices->dimensions().size() != weights->dimensions().size() || indices->element_count() != weights->element_count())
    return invalid("route outputs must be float32 weights and int32 indices of shape [..., topk]");
  const auto bias_dtype = float_dtype(bias.element_type());
  if (!bias_dtype || (bias.element_count() != 0 && int64_t(bias.element_count()) != c.num_experts))
    return invalid("expert_bias must be a float array of shape [num_experts]");

  const BiasLoader bias_loader{bias.element_count() ? bias.untyped_data() : nullptr, *bias_dtype};
  std::vector<uint32_t> key(c.num_experts), gkey(c.num_groups);
  std::vector<float> val(c.num_experts);
  const RouteScratch scratch{key.data(), val.data(), gkey.data()};
  float* w = weights->typed_data<float>();
  int32_t* idx = indices->typed_data<int32_t>();

  return dispatch_float(shapes->logits_dtype, [&]<class In>() {
    const auto* x = static_cast<const typename In::storage*>(logits.untyped_data());
    for (int64_t t = 0; t < shapes->tokens; ++t)
      route_row<SerialLanes, In>(SerialLanes{}, c, x + t * c.num_experts, bias_loader, scratch, w + t * c.topk,
                                 idx + t * c.topk);
    return ffi::Error::Success();
  });
}

ffi::Error route_bwd(ffi::AnyBuffer logits, ffi::AnyBuffer indices, ffi::AnyBuffer dweights,
                     ffi::Result<ffi::AnyBuffer> dlogits, int64_t topk, int64_t score_function, bool pre,
                     int64_t num_groups, int64_t group_topk, int64_t group_score_topn, bool renormalize,
                     float scaling_factor) {
  const RouteConfig requested = make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                  group_score_topn, renormalize, scaling_factor);
  auto shapes = check_route_buffers(logits, indices.dimensions(), requested);
  if (shapes.has_error()) return shapes.error();
  const RouteConfig c = shapes->config;
  if (indices.element_type() != ffi::DataType::S32 || dweights.element_type() != ffi::DataType::F32 ||
      !same_leading(dweights.dimensions(), logits.dimensions(), c.topk) ||
      dlogits->element_type() != logits.element_type() || dlogits->element_count() != logits.element_count())
    return invalid("route backward buffers do not match logits [..., E] and indices/dweights [..., topk]");
  const int32_t* idx = indices.typed_data<int32_t>();
  const float* dw = dweights.typed_data<float>();

  return dispatch_float(shapes->logits_dtype, [&]<class In>() {
    using S = typename In::storage;
    const auto* x = static_cast<const S*>(logits.untyped_data());
    auto* dx = static_cast<S*>(dlogits->untyped_data());
    for (int64_t t = 0; t < shapes->tokens; ++t) {
      const int64_t row = t * c.num_experts, sel = t * c.topk;
      route_bwd_row<SerialLanes, In>(SerialLanes{}, c, x + row, idx + sel, dw + sel, dx + row);
    }
    return ffi::Error::Success();
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

}  // namespace jax_moe
