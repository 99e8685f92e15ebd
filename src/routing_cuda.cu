// CUDA handlers of the routing primitives.
//
// Forward: one warp per token, one launch, nothing [T, E] written. The fast path keeps a token's
// row in registers (lane l holds experts [l*V, l*V+V)), so ties break towards the lower lane;
// it covers E <= 1024, topk <= 32 and groups that map onto whole power-of-two lane segments
// (DeepSeek-V3: 8 groups of 32 experts = 4 lanes of 8). Every other configuration runs the shared
// row algorithm of routing_row.h on a per-warp shared-memory scratch.
// Backward: one warp per token running the shared backward row algorithm.
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <string>

#include "ffi_helpers.h"
#include "handlers.h"
#include "routing_row.h"

namespace jax_moe {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = 8;
constexpr int kMaxFastV = 32;     // experts per lane in registers: E <= 1024
constexpr int kMaxFastTopk = 32;  // one chosen expert per lane

// Warp reductions for the shared row algorithms. The host branch only exists to compile.
struct WarpLanes {
  int lane;
  static constexpr int nlanes = 32;
  MOE_HD bool leader() const { return lane == 0; }
  MOE_HD void sync() const {
#ifdef __CUDA_ARCH__
    __syncwarp();
#endif
  }
  MOE_HD float max(float v) const {
#ifdef __CUDA_ARCH__
    for (int off = 16; off; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
#endif
    return v;
  }
  MOE_HD float sum(float v) const {
#ifdef __CUDA_ARCH__
    for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
#endif
    return v;
  }
  MOE_HD Cand best(Cand c) const {
#ifdef __CUDA_ARCH__
    for (int off = 16; off; off >>= 1) {
      const Cand o{__shfl_xor_sync(kFull, c.key, off), __shfl_xor_sync(kFull, c.idx, off)};
      if (before(o, c)) c = o;
    }
#endif
    return c;
  }
};

// ------------------------------------------------------------------ fast path
// Loads this lane's V logits as float; 16-byte loads when whole rows are lane-aligned.
template <class In, int V>
__device__ void load_lane(const typename In::storage* row, int lane, int E, float (&xv)[V]) {
  using S = typename In::storage;
  constexpr int kBytes = V * int(sizeof(S));
  const int e0 = lane * V;
  if constexpr (kBytes % 16 == 0) {
    if (E == 32 * V) {  // then every row starts 16-byte aligned
      alignas(16) S buf[V];
#pragma unroll
      for (int c = 0; c < kBytes / 16; ++c)
        reinterpret_cast<uint4*>(buf)[c] = __ldg(reinterpret_cast<const uint4*>(row + e0) + c);
#pragma unroll
      for (int i = 0; i < V; ++i) xv[i] = In::to_float(buf[i]);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) xv[i] = e0 + i < E ? In::to_float(row[e0 + i]) : 0.0f;
}

// Group selection when each group is a segment of `lpg` lanes (a power of two). Each lane's keys
// all belong to group lane / lpg. Drops the keys of groups outside the group_topk best.
template <int V>
__device__ void keep_best_groups_fast(const RouteConfig& c, uint32_t (&key)[V], int lane, int lpg) {
  const int seg = lane & ~(lpg - 1);
  const unsigned seg_mask = lpg == 32 ? kFull : ((1u << lpg) - 1u) << seg;
  uint32_t taken = 0;  // bit i: key[i] already counted in the group score
  float total = 0.0f;
  for (int r = 0; r < c.group_score_topn; ++r) {
    uint32_t bk = kExcluded;
    int bi = 0;
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (!((taken >> i) & 1u) && key[i] > bk) bk = key[i], bi = i;
    uint32_t m = bk;
    for (int off = 1; off < lpg; off <<= 1) m = max(m, __shfl_xor_sync(kFull, m, off));
    const unsigned holders = __ballot_sync(kFull, bk == m) & seg_mask;
    if (lane == __ffs(holders) - 1) taken |= 1u << bi;  // the lowest lane holds the lowest index
    total += key_value(m);
  }
  // One candidate per real group, held by the segment's first lane.
  uint32_t cand = (lane == seg && lane / lpg < c.num_groups) ? rank_key(total) : kExcluded;
  bool keep = false;
  for (int p = 0; p < c.group_topk; ++p) {
    const uint32_t m = __reduce_max_sync(kFull, cand);
    const int winner = __ffs(__ballot_sync(kFull, cand == m)) - 1;
    if (lane == winner) cand = kExcluded;
    keep |= seg == winner;
  }
  if (!keep)
#pragma unroll
    for (int i = 0; i < V; ++i) key[i] = kExcluded;
}

template <class In, int V>
__device__ void route_token_fast(const RouteConfig& c, const typename In::storage* row, const float* sbias, int lane,
                                 int lpg, float* w_out, int32_t* idx_out) {
  const int E = int(c.num_experts), e0 = lane * V;
  const WarpLanes L{lane};
  float xv[V];
  load_lane<In, V>(row, lane, E, xv);

  const bool softmax = c.score_function == ScoreFunction::kSoftmax;
  float mx = 0.0f, inv_sum = 1.0f;
  if (softmax) {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (e0 + i < E) m = fmaxf(m, xv[i]);
    mx = L.max(m);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (e0 + i < E) s += expf(xv[i] - mx);
    inv_sum = 1.0f / L.sum(s);
  }
  uint32_t key[V];
  float val[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const int e = e0 + i;
    const float s = softmax ? expf(xv[i] - mx) * inv_sum : elementwise_score(c.score_function, xv[i]);
    val[i] = carried_value(c, xv[i], s);
    key[i] = e < E ? rank_key(val[i] + sbias[e]) : kExcluded;
  }
  if (lpg > 0) keep_best_groups_fast<V>(c, key, lane, lpg);

  // k rounds of warp arg-max; lane j keeps the j-th pick.
  int my_e = 0;
  float my_v = 0.0f;
  for (int j = 0; j < c.topk; ++j) {
    uint32_t bk = kExcluded;
    int bi = 0;
    float bv = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (key[i] > bk) bk = key[i], bi = i, bv = val[i];
    const uint32_t m = __reduce_max_sync(kFull, bk);
    const int winner = __ffs(__ballot_sync(kFull, bk == m)) - 1;
    if (lane == winner)
#pragma unroll
      for (int i = 0; i < V; ++i)
        if (i == bi) key[i] = kExcluded;
    const int e = __shfl_sync(kFull, e0 + bi, winner);
    const float v = __shfl_sync(kFull, bv, winner);
    if (lane == j) my_e = e, my_v = v;
  }

  const bool mine = lane < c.topk;
  float w = my_v;
  if (c.softmax_post()) {
    const float m = L.max(mine ? my_v : -INFINITY);
    const float q = mine ? expf(my_v - m) : 0.0f;
    w = q / L.sum(q);
  } else if (c.renormalize) {
    w = my_v / (L.sum(mine ? my_v : 0.0f) + kEps);
  }
  if (mine) {
    w_out[lane] = w * c.scaling_factor;
    idx_out[lane] = my_e;
  }
}

template <class In, int V>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_fast_kernel(RouteConfig c, const typename In::storage* __restrict__ x, BiasLoader bias, int64_t T, int lpg,
                      float* __restrict__ w, int32_t* __restrict__ idx) {
  extern __shared__ float sbias[];  // the bias, converted once per block
  for (int e = threadIdx.x; e < c.num_experts; e += blockDim.x) sbias[e] = bias(e);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; t < T; t += stride)
    route_token_fast<In, V>(c, x + t * c.num_experts, sbias, lane, lpg, w + t * c.topk, idx + t * c.topk);
}

// --------------------------------------------------------------- generic path
template <class In>
__global__ void route_generic_kernel(RouteConfig c, const typename In::storage* __restrict__ x, BiasLoader bias,
                                     int64_t T, int warps_per_block, float* __restrict__ w, int32_t* __restrict__ idx) {
  extern __shared__ uint32_t scratch[];  // per warp: key[E], val[E], gkey[G]
  const int64_t E = c.num_experts, per_warp = 2 * E + c.num_groups;
  uint32_t* mine = scratch + (threadIdx.x / 32) * per_warp;
  const RouteScratch s{mine, reinterpret_cast<float*>(mine + E), mine + 2 * E};
  const WarpLanes L{int(threadIdx.x & 31)};
  const int64_t stride = int64_t(gridDim.x) * warps_per_block;
  for (int64_t t = int64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32; t < T; t += stride) {
    route_row<WarpLanes, In>(L, c, x + t * E, bias, s, w + t * c.topk, idx + t * c.topk);
    __syncwarp();  // the next token reuses the scratch
  }
}

template <class In>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_bwd_kernel(RouteConfig c, const typename In::storage* __restrict__ x, const int32_t* __restrict__ idx,
                     const float* __restrict__ dw, typename In::storage* __restrict__ dx, int64_t T) {
  const WarpLanes L{int(threadIdx.x & 31)};
  const int64_t E = c.num_experts, k = c.topk, stride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; t < T; t += stride) {
    route_bwd_row<WarpLanes, In>(L, c, x + t * E, idx + t * k, dw + t * k, dx + t * E);
    __syncwarp();
  }
}

// ------------------------------------------------------------------- launch
struct DeviceLimits {
  int sm_count;
  int smem_optin;  // bytes of dynamic shared memory a block may opt in to
};

// Queried once per device: handlers run on many calls, possibly from several threads.
DeviceLimits device_limits(int device) {
  static std::array<std::atomic<int>, 64> sms{}, smem{};
  const int slot = device & 63;
  if (sms[slot].load() == 0) {
    int n = 0, bytes = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    smem[slot].store(bytes);
    sms[slot].store(n > 0 ? n : 1);
  }
  return {sms[slot].load(), smem[slot].load()};
}

// Grid for one warp per token, capped so blocks stay resident and loop over tokens.
unsigned token_grid(int64_t tokens, int warps_per_block, const DeviceLimits& dev) {
  const int64_t blocks = (tokens + warps_per_block - 1) / warps_per_block;
  return unsigned(std::min<int64_t>(blocks, int64_t(dev.sm_count) * 16));
}

ffi::Error launch_status(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jax_moe: ") + what + ": " + cudaGetErrorString(err));
}

// Experts per lane for the fast path, or 0 when E is too large for registers.
int fast_lane_width(int64_t E) {
  for (int v = 1; v <= kMaxFastV; v *= 2)
    if (32 * v >= E) return v;
  return 0;
}

// Lanes per group for the fast path: 0 without groups, -1 when groups do not fit lane segments.
int fast_lanes_per_group(const RouteConfig& c, int V) {
  if (c.num_groups == 0) return 0;
  const int64_t gs = c.group_size();
  if (gs % V) return -1;
  const int64_t lpg = gs / V;
  return (lpg <= 32 && (lpg & (lpg - 1)) == 0) ? int(lpg) : -1;
}

template <class In, int V>
void launch_fast(const RouteConfig& c, const void* x, BiasLoader bias, int64_t T, int lpg, float* w, int32_t* idx,
                 cudaStream_t stream, const DeviceLimits& dev) {
  route_fast_kernel<In, V><<<token_grid(T, kWarpsPerBlock, dev), kWarpsPerBlock * 32, c.num_experts * sizeof(float),
                             stream>>>(c, static_cast<const typename In::storage*>(x), bias, T, lpg, w, idx);
}

template <class In>
ffi::Error route_fwd_typed(cudaStream_t stream, const DeviceLimits& dev, const RouteConfig& c, const void* x,
                           BiasLoader bias, int64_t T, float* w, int32_t* idx) {
  const int V = fast_lane_width(c.num_experts);
  const int lpg = V ? fast_lanes_per_group(c, V) : -1;
  if (V && lpg >= 0 && c.topk <= kMaxFastTopk) {
    switch (V) {
      case 1: launch_fast<In, 1>(c, x, bias, T, lpg, w, idx, stream, dev); break;
      case 2: launch_fast<In, 2>(c, x, bias, T, lpg, w, idx, stream, dev); break;
      case 4: launch_fast<In, 4>(c, x, bias, T, lpg, w, idx, stream, dev); break;
      case 8: launch_fast<In, 8>(c, x, bias, T, lpg, w, idx, stream, dev); break;
      case 16: launch_fast<In, 16>(c, x, bias, T, lpg, w, idx, stream, dev); break;
      default: launch_fast<In, 32>(c, x, bias, T, lpg, w, idx, stream, dev); break;
    }
    return launch_status("route forward (fast path)");
  }
  const size_t per_warp = (2 * c.num_experts + c.num_groups) * sizeof(uint32_t);
  if (per_warp > size_t(dev.smem_optin))
    return invalid("num_experts=" + std::to_string(c.num_experts) + " exceeds the shared memory of this GPU");
  const int warps = int(std::min<size_t>(4, dev.smem_optin / per_warp));
  const size_t bytes = per_warp * warps;
  cudaFuncSetAttribute(route_generic_kernel<In>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  route_generic_kernel<In><<<token_grid(T, warps, dev), warps * 32, bytes, stream>>>(
      c, static_cast<const typename In::storage*>(x), bias, T, warps, w, idx);
  return launch_status("route forward (generic path)");
}

ffi::Error route_fwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer logits, ffi::AnyBuffer bias,
                     ffi::Result<ffi::AnyBuffer> weights, ffi::Result<ffi::AnyBuffer> indices, int64_t topk,
                     int64_t score_function, bool pre, int64_t num_groups, int64_t group_topk,
                     int64_t group_score_topn, bool renormalize, float scaling_factor) {
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
  if (c.num_experts > INT32_MAX) return invalid("num_experts must fit in int32");
  if (shapes->tokens == 0) return ffi::Error::Success();

  const BiasLoader bias_loader{bias.element_count() ? bias.untyped_data() : nullptr, *bias_dtype};
  const DeviceLimits dev = device_limits(device);
  float* w = weights->typed_data<float>();
  int32_t* idx = indices->typed_data<int32_t>();
  return dispatch_float(shapes->logits_dtype, [&]<class In>() {
    return route_fwd_typed<In>(stream, dev, c, logits.untyped_data(), bias_loader, shapes->tokens, w, idx);
  });
}

ffi::Error route_bwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer logits, ffi::AnyBuffer indices,
                     ffi::AnyBuffer dweights, ffi::Result<ffi::AnyBuffer> dlogits, int64_t topk,
                     int64_t score_function, bool pre, int64_t num_groups, int64_t group_topk,
                     int64_t group_score_topn, bool renormalize, float scaling_factor) {
  const RouteConfig requested = make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                  group_score_topn, renormalize, scaling_factor);
  auto shapes = check_route_buffers(logits, indices.dimensions(), requested);
  if (shapes.has_error()) return shapes.error();
  const RouteConfig c = shapes->config;
  if (indices.element_type() != ffi::DataType::S32 || dweights.element_type() != ffi::DataType::F32 ||
      !same_leading(dweights.dimensions(), logits.dimensions(), c.topk) ||
      dlogits->element_type() != logits.element_type() || dlogits->element_count() != logits.element_count())
    return invalid("route backward buffers do not match logits [..., E] and indices/dweights [..., topk]");
  if (shapes->tokens == 0) return ffi::Error::Success();

  const DeviceLimits dev = device_limits(device);
  return dispatch_float(shapes->logits_dtype, [&]<class In>() {
    using S = typename In::storage;
    route_bwd_kernel<In><<<token_grid(shapes->tokens, kWarpsPerBlock, dev), kWarpsPerBlock * 32, 0, stream>>>(
        c, static_cast<const S*>(logits.untyped_data()), indices.typed_data<int32_t>(), dweights.typed_data<float>(),
        static_cast<S*>(dlogits->untyped_data()), shapes->tokens);
    return launch_status("route backward");
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_fwd_cuda, route_fwd,
                              bind_route_attrs(ffi::Ffi::Bind()
                                                   .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                   .Ctx<ffi::DeviceOrdinal>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_bwd_cuda, route_bwd,
                              bind_route_attrs(ffi::Ffi::Bind()
                                                   .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                   .Ctx<ffi::DeviceOrdinal>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_moe
