// Small helpers shared by the FFI handlers of both platforms.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "moe_math.h"
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

struct RouteShapes {
  RouteConfig config;
  Dtype logits_dtype;
  int64_t tokens;
};

// Validates logits [..., E] against outputs/inputs [..., k]; returns the shapes or an error.
inline ffi::ErrorOr<RouteShapes> check_route_buffers(const ffi::AnyBuffer& logits, ffi::Span<const int64_t> topk_dims,
                                                     RouteConfig config) {
  const auto dims = logits.dimensions();
  auto fail = [](const std::string& what) { return ffi::Unexpected<ffi::Error>(invalid(what)); };
  if (dims.size() == 0) return fail("logits must have rank >= 1");
  const auto dtype = float_dtype(logits.element_type());
  if (!dtype) return fail("logits must be float32, bfloat16 or float16");
  config.num_experts = dims.back();
  if (const char* err = route_config_error(config)) return fail(err);
  if (!same_leading(topk_dims, dims, config.topk)) return fail("routing buffers must be [..., topk] like logits");
  return RouteShapes{config, *dtype, leading_count(dims)};
}

}  // namespace jax_moe
