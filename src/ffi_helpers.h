// Small helpers shared by the FFI handlers of both platforms.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "routing_row.h"
#include "xla/ffi/api/ffi.h"

namespace jax_moe {

namespace ffi = xla::ffi;

inline std::optional<Dtype> float_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return Dtype::kF32;
    case ffi::DataType::BF16: return Dtype::kBF16;
    case ffi::DataType::F16: return Dtype::kF16;
    default: return std::nullopt;
  }
}

// Calls f.template operator()<Traits>() for the element type t (F32, BF16 or F16).
template <class F>
ffi::Error dispatch_float(Dtype t, F&& f) {
  switch (t) {
    case Dtype::kBF16: return f.template operator()<BF16>();
    case Dtype::kF16: return f.template operator()<F16>();
    default: return f.template operator()<F32>();
  }
}

inline ffi::Error invalid(const std::string& what) { return ffi::Error::InvalidArgument("jax_moe: " + what); }

// Product of all but the last dimension: the token count of a [..., X] buffer.
inline int64_t leading_count(ffi::Span<const int64_t> dims) {
  int64_t n = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) n *= dims[i];
  return n;
}

// True when b is [..., last] with the same leading dimensions as `like`.
inline bool same_leading(ffi::Span<const int64_t> b, ffi::Span<const int64_t> like, int64_t last) {
  if (b.size() != like.size() || b.size() == 0) return false;
  for (size_t i = 0; i + 1 < b.size(); ++i)
    if (b[i] != like[i]) return false;
  return b.back() == last;
}

// ------------------------------------------------------------------ routing
// Attributes of the routing primitives, in the order the handlers' bindings declare them.
template <class Binding>
auto bind_route_attrs(Binding b) {
  return std::move(b).template Attr<int64_t>("topk")
      .template Attr<int64_t>("score_function")
      .template Attr<bool>("use_pre_softmax")
      .template Attr<int64_t>("num_groups")
      .template Attr<int64_t>("group_topk")
      .template Attr<int64_t>("group_score_topn")
      .template Attr<bool>("renormalize")
      .template Attr<float>("scaling_factor");
}

inline RouteConfig make_route_config(int64_t num_experts, int64_t topk, int64_t score_function, bool pre,
                                     int64_t num_groups, int64_t group_topk, int64_t group_score_topn,
                                     bool renormalize, float scaling_factor) {
  return RouteConfig{num_experts, topk,       ScoreFunction(score_function), pre, num_groups,
                     group_topk,  group_score_topn, renormalize,            scaling_factor};
}

// The validated buffers of a routing forward call.
struct RouteFwdBuffers {
  RouteConfig config;  // with num_experts from the logits
  Dtype logits_dtype;
  int64_t tokens;
  BiasLoader bias;
  float* weights;
  int32_t* indices;
};

inline ffi::Unexpected<ffi::Error> failure(const std::string& what) { return ffi::Unexpected<ffi::Error>(invalid(what)); }

// logits [..., E] of a float dtype, with a config valid for E: the config with E filled in.
inline ffi::ErrorOr<RouteConfig> check_logits(const ffi::AnyBuffer& logits, RouteConfig config) {
  if (logits.dimensions().size() == 0) return failure("logits must have rank >= 1");
  if (!float_dtype(logits.element_type())) return failure("logits must be float32, bfloat16 or float16");
  config.num_experts = logits.dimensions().back();
  if (const char* err = route_config_error(config)) return failure(err);
  return config;
}

// logits [..., E], bias [E] or [0], weights f32 and indices s32 [..., topk].
inline ffi::ErrorOr<RouteFwdBuffers> check_route_fwd(const ffi::AnyBuffer& logits, const ffi::AnyBuffer& bias,
                                                     ffi::AnyBuffer weights, ffi::AnyBuffer indices,
                                                     RouteConfig requested) {
  auto checked = check_logits(logits, requested);
  if (checked.has_error()) return ffi::Unexpected<ffi::Error>(checked.error());
  const RouteConfig config = *checked;
  const auto dims = logits.dimensions();
  if (weights.element_type() != ffi::DataType::F32 || indices.element_type() != ffi::DataType::S32 ||
      !same_leading(weights.dimensions(), dims, config.topk) || !same_leading(indices.dimensions(), dims, config.topk))
    return failure("route outputs must be float32 weights and int32 indices of shape [..., topk] like logits");
  const auto bias_dtype = float_dtype(bias.element_type());
  const int64_t bias_count = int64_t(bias.element_count());
  if (!bias_dtype || (bias_count != 0 && bias_count != config.num_experts))
    return failure("expert_bias must be a float array of shape [num_experts]");
  return RouteFwdBuffers{config,
                         *float_dtype(logits.element_type()),
                         leading_count(dims),
                         BiasLoader{bias_count ? bias.untyped_data() : nullptr, *bias_dtype},
                         weights.typed_data<float>(),
                         indices.typed_data<int32_t>()};
}

// The validated buffers of a routing backward call.
struct RouteBwdBuffers {
  RouteConfig config;
  Dtype logits_dtype;
  int64_t tokens;
  const void* logits;
  const int32_t* indices;
  const float* dweights;
  void* dlogits;
};

// logits [..., E], indices s32 and dweights f32 [..., topk], dlogits like logits.
inline ffi::ErrorOr<RouteBwdBuffers> check_route_bwd(const ffi::AnyBuffer& logits, const ffi::AnyBuffer& indices,
                                                     const ffi::AnyBuffer& dweights, ffi::AnyBuffer dlogits,
                                                     RouteConfig requested) {
  auto checked = check_logits(logits, requested);
  if (checked.has_error()) return ffi::Unexpected<ffi::Error>(checked.error());
  const RouteConfig config = *checked;
  const auto dims = logits.dimensions();
  if (indices.element_type() != ffi::DataType::S32 || dweights.element_type() != ffi::DataType::F32 ||
      !same_leading(indices.dimensions(), dims, config.topk) || !same_leading(dweights.dimensions(), dims, config.topk) ||
      dlogits.element_type() != logits.element_type() || dlogits.element_count() != logits.element_count())
    return failure("route backward buffers do not match logits [..., E] and indices/dweights [..., topk]");
  return RouteBwdBuffers{config,
                         *float_dtype(logits.element_type()),
                         leading_count(dims),
                         logits.untyped_data(),
                         indices.typed_data<int32_t>(),
                         dweights.typed_data<float>(),
                         dlogits.untyped_data()};
}

inline bool is_vector(const ffi::AnyBuffer& b, ffi::DataType t, int64_t n) {
  return b.element_type() == t && b.dimensions().size() == 1 && b.dimensions()[0] == n;
}

inline bool is_scalar(const ffi::AnyBuffer& b, ffi::DataType t) {
  return b.element_type() == t && b.dimensions().size() == 0;
}

// The aux outputs of the fused forward: colsum f32 [E], counts s32 [E], the loss f32 [], workspaces [B, E].
// Returns B.
inline ffi::ErrorOr<int64_t> check_route_aux_outputs(int64_t E, int64_t aux_topk, int64_t aux_score_function,
                                                     ffi::AnyBuffer colsum, ffi::AnyBuffer counts, ffi::AnyBuffer loss,
                                                     ffi::AnyBuffer ws_colsum, ffi::AnyBuffer ws_counts) {
  if (aux_topk < 1 || aux_topk > E) return failure("aux_topk must be in [1, num_experts]");
  if (aux_score_function < 0 || aux_score_function > 2) return failure("unknown aux_score_function");
  if (!is_vector(colsum, ffi::DataType::F32, E) || !is_vector(counts, ffi::DataType::S32, E))
    return failure("aux outputs must be float32 column sums and int32 counts of shape [num_experts]");
  if (!is_scalar(loss, ffi::DataType::F32)) return failure("the aux loss output must be a float32 scalar");
  const auto wd = ws_colsum.dimensions();
  if (wd.size() != 2 || wd[1] != E || ws_colsum.element_type() != ffi::DataType::F32 ||
      ws_counts.element_type() != ffi::DataType::S32 || ws_counts.element_count() != ws_colsum.element_count())
    return failure("aux workspaces must be float32 and int32 arrays of shape [blocks, num_experts]");
  return wd[0];
}

// route_with_aux_loss's backward: the forward's counts and the loss cotangent.
inline std::optional<ffi::Error> check_aux_cotangent(int64_t E, int64_t aux_score_function, const ffi::AnyBuffer& counts,
                                                     const ffi::AnyBuffer& dloss) {
  if (aux_score_function < 0 || aux_score_function > 2) return invalid("unknown aux_score_function");
  if (!is_vector(counts, ffi::DataType::S32, E)) return invalid("aux counts must be int32 [num_experts]");
  if (!is_scalar(dloss, ffi::DataType::F32)) return invalid("the aux loss cotangent must be a float32 scalar");
  return std::nullopt;
}

}  // namespace jax_moe
