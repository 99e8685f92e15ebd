// Math shared by the CPU and CUDA kernels, written once as __host__ __device__ inline functions.
// Every kernel computes in float32 whatever its input dtype (SPEC: "All arithmetic inside kernels is float32").
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define MOE_HD __host__ __device__ __forceinline__
#else
#define MOE_HD inline
#endif

namespace jax_moe {

constexpr float kEps = 1e-20f;

// Values match the Python side (jax_moe/routing.py, _SCORE_FUNCTIONS).
enum class ScoreFunction : int64_t { kSoftmax = 0, kSigmoid = 1, kSqrtSoftplus = 2 };

// ------------------------------------------------------------------ dtypes
// Element types of the buffers, independent of XLA's enum so the header stays FFI-free.
enum class Dtype : int { kF32, kBF16, kF16 };

MOE_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

MOE_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// bf16 and f16 are handled as raw 16-bit patterns so the CPU build needs no half-precision types.
MOE_HD float bf16_to_float(uint16_t h) { return bits_float(uint32_t(h) << 16); }

MOE_HD uint16_t float_to_bf16(float f) {
#ifdef __CUDA_ARCH__
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));  // one conversion instruction (sm_80+); NaN stays NaN
#else
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                          // round to nearest even
  return uint16_t(u >> 16);
#endif
}

MOE_HD float f16_to_float(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bits_float(sign);
    // Subnormal: normalise the mantissa.
    exp = 1;
    while (!(man & 0x400u)) { man <<= 1; --exp; }
    man &= 0x3ffu;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}

MOE_HD uint16_t float_to_f16(float f) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(f));
#else
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);                 // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);                // overflow rounds to inf
  if (a < 0x38800000u) {                                                // f16 subnormal or zero
    const float scaled = bits_float(a) * 16777216.0f;                   // 2^24: units of the f16 ulp
    return uint16_t(sign | uint16_t(std::nearbyint(scaled)));
  }
  const uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;       // rebias and round to even
  return uint16_t(sign | uint16_t(r >> 13));
#endif
}

MOE_HD float load_float(const void* p, int64_t i, Dtype t) {
  switch (t) {
    case Dtype::kBF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case Dtype::kF16: return f16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

MOE_HD void store_float(void* p, int64_t i, float v, Dtype t) {
  switch (t) {
    case Dtype::kBF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    case Dtype::kF16: static_cast<uint16_t*>(p)[i] = float_to_f16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// Element-type traits for templated kernels: storage type plus float conversion.
struct F32 {
  using storage = float;
  static constexpr Dtype dtype = Dtype::kF32;
  static MOE_HD float to_float(float v) { return v; }
  static MOE_HD float from_float(float v) { return v; }
};
struct BF16 {
  using storage = uint16_t;
  static constexpr Dtype dtype = Dtype::kBF16;
  static MOE_HD float to_float(uint16_t v) { return bf16_to_float(v); }
  static MOE_HD uint16_t from_float(float v) { return float_to_bf16(v); }
};
struct F16 {
  using storage = uint16_t;
  static constexpr Dtype dtype = Dtype::kF16;
  static MOE_HD float to_float(uint16_t v) { return f16_to_float(v); }
  static MOE_HD uint16_t from_float(float v) { return float_to_f16(v); }
};

// ---------------------------------------------------------- score functions
// e^x for the streaming softmax sums of the aux loss. On the GPU the flush-to-zero approximation of
// 2^(x log2 e): two instructions instead of ~10 for expf, relative error about 2^-22 plus |x| times
// the rounding of x log2 e (under 1e-6 where e^x matters next to a row's maximum term, 1); e^-inf = 0.
MOE_HD float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x * 1.4426950408889634f));
  return e;
#else
  return expf(x);
#endif
}

MOE_HD float sigmoid(float x) {
#ifdef __CUDA_ARCH__
  // Four instructions (the IEEE forms take ~25): fast_exp and the flush-to-zero approximation of 1/y
  // (1 ulp). Subnormals cannot change the result: e^-x only flushes where 1 + e^-x rounds to 1, and
  // 1 + e^-x >= 1 is never subnormal.
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + fast_exp(-x)));
  return r;
#else
  return 1.0f / (1.0f + expf(-x));
#endif
}
MOE_HD float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// Score of one logit for the elementwise score functions (softmax needs the row's statistics).
MOE_HD float elementwise_score(ScoreFunction f, float x) {
  return f == ScoreFunction::kSigmoid ? sigmoid(x) : sqrtf(softplus(x));
}

// ds/dx given x and s = elementwise_score(f, x).
MOE_HD float elementwise_score_grad(ScoreFunction f, float x, float s) {
  if (f == ScoreFunction::kSigmoid) return s * (1.0f - s);
  const float dsoftplus = x > 20.0f ? 1.0f : sigmoid(x);
  return dsoftplus / (2.0f * s + kEps);
}

// Calls fn.template operator()<F>() with F = f, a constant there. Code unrolled over a piece of a row
// should choose the score function once this way: with f a run-time value, the GPU kernels computed
// every function for every element (speculated selects), which took the row backwards twice as long.
template <class Fn>
MOE_HD void with_score_function(ScoreFunction f, Fn&& fn) {
  switch (f) {
    case ScoreFunction::kSoftmax: return fn.template operator()<ScoreFunction::kSoftmax>();
    case ScoreFunction::kSigmoid: return fn.template operator()<ScoreFunction::kSigmoid>();
    default: return fn.template operator()<ScoreFunction::kSqrtSoftplus>();
  }
}

// The same for the elementwise score functions only (sigmoid or sqrtsoftplus).
template <class Fn>
MOE_HD void with_elementwise_function(ScoreFunction f, Fn&& fn) {
  if (f == ScoreFunction::kSigmoid) return fn.template operator()<ScoreFunction::kSigmoid>();
  return fn.template operator()<ScoreFunction::kSqrtSoftplus>();
}

// ----------------------------------------------------------------- ranking
// Ranking key: a larger key ranks first. IEEE order for numbers (-0.0 == +0.0), NaN below -inf.
// Key 0 is reserved for "not a candidate" (an excluded expert); NaN is 1; -inf is 0x007fffff.
constexpr uint32_t kExcluded = 0;
constexpr uint32_t kNanKey = 1;

// rank_key_no_neg_zero without its NaN test, for kernels that test a whole row for NaN at once: a NaN
// maps outside [key(-inf), key(+inf)], and repair_nan_key sends such a key to kNanKey.
MOE_HD uint32_t rank_key_unless_nan(float v) {
  const uint32_t u = float_bits(v);
  return u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);  // negative: every bit, else the sign
}

MOE_HD uint32_t repair_nan_key(uint32_t key) {
  constexpr uint32_t kMinusInf = 0x007fffffu, kPlusInf = 0xff800000u;
  return key - kMinusInf > kPlusInf - kMinusInf ? kNanKey : key;
}

// rank_key of a v that is not -0.0 (a sum with an addend other than -0.0 never is).
MOE_HD uint32_t rank_key_no_neg_zero(float v) {
  return v != v ? kNanKey : rank_key_unless_nan(v);  // branch-free: kernels call it per expert
}

MOE_HD uint32_t rank_key(float v) { return rank_key_no_neg_zero(v + 0.0f); }  // -0.0 + 0.0 = +0.0: they tie

MOE_HD float key_value(uint32_t key) {
  if (key == kNanKey) return NAN;
  return bits_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// Total order of candidates: higher key first, then the lower index.
MOE_HD bool ranks_before(uint32_t key_a, int32_t idx_a, uint32_t key_b, int32_t idx_b) {
  return key_a > key_b || (key_a == key_b && idx_a < idx_b);
}

// ------------------------------------------------------------ routing config
struct RouteConfig {
  int64_t num_experts;
  int64_t topk;
  ScoreFunction score_function;
  bool use_pre_softmax;
  int64_t num_groups;        // 0: no groups
  int64_t group_topk;
  int64_t group_score_topn;
  bool renormalize;
  float scaling_factor;

  MOE_HD bool softmax_post() const { return score_function == ScoreFunction::kSoftmax && !use_pre_softmax; }
  MOE_HD int64_t group_size() const { return num_experts / num_groups; }
};

// Validates what the kernels rely on; returns nullptr when the config is usable.
inline const char* route_config_error(const RouteConfig& c) {
  if (c.num_experts < 1) return "num_experts must be >= 1";
  if (c.topk < 1 || c.topk > c.num_experts) return "topk must be in [1, num_experts]";
  if (int64_t(c.score_function) < 0 || int64_t(c.score_function) > 2) return "unknown score_function";
  if (c.softmax_post() && c.renormalize) return "softmax without use_pre_softmax is already normalised";
  if (c.num_groups == 0) return nullptr;
  if (c.num_groups < 0 || c.num_experts % c.num_groups) return "num_groups must divide num_experts";
  if (c.group_topk < 1 || c.group_topk > c.num_groups) return "group_topk must be in [1, num_groups]";
  if (c.group_score_topn < 1 || c.group_score_topn > c.group_size())
    return "group_score_topn must be in [1, num_experts / num_groups]";
  if (c.topk > c.group_topk * c.group_size()) return "topk exceeds the experts of the kept groups";
  return nullptr;
}

// The value a chosen expert carries before normalisation: the score, or the raw logit for
// softmax-post (whose weights are a softmax over the chosen logits).
MOE_HD float carried_value(const RouteConfig& c, float x, float s) { return c.softmax_post() ? x : s; }

// --------------------------------------------------------------- backward
// With v the carried values of the chosen experts and g = scaling_factor * dweights:
// h_j = g_j / (S + eps) - sum(g v) / (S + eps)^2 when renormalised (S = sum v), else h_j = g_j.
struct RenormGrad {
  float inv_s;     // 1 / (S + eps), or 1 when not renormalised
  float gv_term;   // sum(g v) / (S + eps)^2, or 0
  MOE_HD float h(float g) const { return g * inv_s - gv_term; }
};

MOE_HD RenormGrad renorm_grad(bool renormalize, float sum_v, float sum_gv) {
  if (!renormalize) return {1.0f, 0.0f};
  const float inv = 1.0f / (sum_v + kEps);
  return {inv, sum_gv * inv * inv};
}

}  // namespace jax_moe
