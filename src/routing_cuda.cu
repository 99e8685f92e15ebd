// CUDA handlers of the routing primitives, plain and fused with the aux loss statistics.
//
// Forward: one launch, nothing [T, E] written. Three paths:
//  * thread per token for E <= 32 without groups (a whole row in one thread's registers);
//  * warp per token for E <= 1024, topk <= 32 and groups that map onto whole power-of-two lane
//    segments (DeepSeek-V3: 8 groups of 32 experts = 4 lanes of 8); lane l holds experts
//    [l*V, l*V+V) in registers, so ties break towards the lower lane;
//  * otherwise the shared row algorithm of routing_row.h, a warp per token on shared memory.
// The fused aux variant also accumulates clean-score column sums and top-k counts per block into a
// workspace [blocks, E], which a second small kernel adds up in block order: deterministic.
// Backward: one warp per token running the shared backward row algorithm.
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <string>

#include "ffi_helpers.h"
#include "handlers.h"
#include "lanes_cuda.cuh"
#include "route_aux_row.h"

namespace jax_moe {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMaxFastV = 32;     // experts per lane in registers: E <= 1024
constexpr int kMaxFastTopk = 32;  // one chosen expert per lane

// Where the fused aux variant of a forward kernel leaves its per-block partial statistics.
struct AuxArgs {
  AuxConfig cfg;
  float* ws_colsum;    // [gridDim.x, E]
  int32_t* ws_counts;  // [gridDim.x, E]
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
  const unsigned seg_mask = lpg == 32 ? kFullMask : ((1u << lpg) - 1u) << seg;
  uint32_t taken = 0;  // bit i: key[i] already counted in the group score
  float total = 0.0f;
  for (int r = 0; r < c.group_score_topn; ++r) {
    uint32_t bk = kExcluded;
    int bi = 0;
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (!((taken >> i) & 1u) && key[i] > bk) bk = key[i], bi = i;
    uint32_t m = bk;
    for (int off = 1; off < lpg; off <<= 1) m = max(m, __shfl_xor_sync(kFullMask, m, off));
    const unsigned holders = __ballot_sync(kFullMask, bk == m) & seg_mask;
    if (lane == __ffs(holders) - 1) taken |= 1u << bi;  // the lowest lane holds the lowest index
    total += key_value(m);
  }
  // One candidate per real group, held by the segment's first lane.
  uint32_t cand = (lane == seg && lane / lpg < c.num_groups) ? rank_key(total) : kExcluded;
  bool keep = false;
  for (int p = 0; p < c.group_topk; ++p) {
    const uint32_t m = __reduce_max_sync(kFullMask, cand);
    const int winner = __ffs(__ballot_sync(kFullMask, cand == m)) - 1;
    if (lane == winner) cand = kExcluded;
    keep |= seg == winner;
  }
  if (!keep)
#pragma unroll
    for (int i = 0; i < V; ++i) key[i] = kExcluded;
}

// Per-warp shared memory of the fast path: the candidates of the top-k and the picks.
struct FastScratch {
  uint32_t key[32];
  int32_t expert[32];
  float val[32];
};

// The k best of the warp's keys when at most 32 experts can be among them; false otherwise.
// A key can only make the top k if it is >= tau, the k-th largest of the 32 lane maxima (at least
// k keys reach tau). Those few candidates are ranked against each other with shuffles, which
// costs O(V + candidates) per lane instead of the O(k * V) of k rounds of arg-max.
template <int V>
__device__ bool topk_by_candidates(int k, const uint32_t (&key)[V], const float (&val)[V], int lane,
                                   FastScratch& s, int* my_e, float* my_v) {
  const int e0 = lane * V;
  uint32_t lane_max = kExcluded;
#pragma unroll
  for (int i = 0; i < V; ++i) lane_max = max(lane_max, key[i]);
  uint32_t tau = kExcluded, m = lane_max;
  for (int p = 0; p < k; ++p) {
    tau = __reduce_max_sync(kFullMask, m);
    if (lane == __ffs(__ballot_sync(kFullMask, m == tau)) - 1) m = kExcluded;
  }
  tau = max(tau, kExcluded + 1);  // never admit excluded experts
  int count = 0;
#pragma unroll
  for (int i = 0; i < V; ++i) count += key[i] >= tau;
  const int total = int(__reduce_add_sync(kFullMask, unsigned(count)));
  if (total > 32) return false;  // many ties at tau: let the caller take the exact slow route

  int slot = count;  // inclusive prefix sum of the counts, then exclusive
  for (int off = 1; off < 32; off <<= 1) {
    const int up = __shfl_up_sync(kFullMask, slot, off);
    if (lane >= off) slot += up;
  }
  slot -= count;
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (key[i] >= tau) s.key[slot] = key[i], s.expert[slot] = e0 + i, s.val[slot] = val[i], ++slot;
  __syncwarp();
  const bool holds = lane < total;
  const uint32_t ck = holds ? s.key[lane] : kExcluded;
  const int32_t ce = holds ? s.expert[lane] : INT32_MAX;
  const float cv = holds ? s.val[lane] : 0.0f;
  int rank = 0;
  for (int q = 0; q < total; ++q)
    rank += ranks_before(__shfl_sync(kFullMask, ck, q), __shfl_sync(kFullMask, ce, q), ck, ce);
  __syncwarp();
  if (holds && rank < k) s.expert[rank] = ce, s.val[rank] = cv;
  __syncwarp();
  if (lane < k) *my_e = s.expert[lane], *my_v = s.val[lane];
  __syncwarp();  // the scratch is reused by the next call
  return true;
}

// The k best keys by k rounds of warp arg-max: exact whatever the ties.
template <int V>
__device__ void topk_by_rounds(int k, uint32_t (&key)[V], const float (&val)[V], int lane, int* my_e, float* my_v) {
  const int e0 = lane * V;
  for (int j = 0; j < k; ++j) {
    uint32_t bk = kExcluded;
    int bi = 0;
    float bv = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (key[i] > bk) bk = key[i], bi = i, bv = val[i];
    const uint32_t m = __reduce_max_sync(kFullMask, bk);
    const int winner = __ffs(__ballot_sync(kFullMask, bk == m)) - 1;
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (lane == winner && i == bi) key[i] = kExcluded;
    const int e = __shfl_sync(kFullMask, e0 + bi, winner);
    const float v = __shfl_sync(kFullMask, bv, winner);
    if (lane == j) *my_e = e, *my_v = v;
  }
}

// Lane j < k gets the j-th best key's expert and value.
template <int V>
__device__ void warp_topk(int k, uint32_t (&key)[V], const float (&val)[V], int lane, FastScratch& s, int* my_e,
                          float* my_v) {
  if (!topk_by_candidates<V>(k, key, val, lane, s, my_e, my_v)) topk_by_rounds<V>(k, key, val, lane, my_e, my_v);
}

// Fused aux statistics of one token on the warp path: clean scores into this lane's column sums,
// the top-k experts by clean score into the block's shared-memory histogram.
template <int V>
__device__ void aux_token_fast(const AuxConfig& a, const float (&xv)[V], int lane, int E, float (&colsum)[V],
                               int* counts, FastScratch& scratch) {
  const WarpLanes L{lane, kFullMask};
  const int e0 = lane * V;
  const bool softmax = a.score_function == ScoreFunction::kSoftmax;
  float mx = 0.0f;
  if (softmax) {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (e0 + i < E) m = fmaxf(m, xv[i]);
    mx = L.max(m);
  }
  float num[V], total = 0.0f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    num[i] = e0 + i < E ? (softmax ? expf(xv[i] - mx) : elementwise_score(a.score_function, xv[i])) : 0.0f;
    total += num[i];
  }
  const float denom = softmax ? L.sum(total) : L.sum(total) + kEps;  // as CleanStats
  uint32_t key[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const float s = num[i] / denom;
    if (e0 + i < E) colsum[i] += s;
    key[i] = e0 + i < E ? rank_key(s) : kExcluded;
  }
  int e = 0;
  float unused = 0.0f;
  warp_topk<V>(int(a.topk), key, num, lane, scratch, &e, &unused);
  if (lane < a.topk) atomicAdd(&counts[e], 1);  // integer counts: order does not matter
}

template <class In, int V, bool kAux>
__device__ void route_token_fast(const RouteConfig& c, const AuxConfig& a, const typename In::storage* row,
                                 const float* sbias, int lane, int lpg, FastScratch& scratch, float (&colsum)[V],
                                 int* counts, float* w_out, int32_t* idx_out) {
  const int E = int(c.num_experts), e0 = lane * V;
  const WarpLanes L{lane, kFullMask};
  float xv[V];
  load_lane<In, V>(row, lane, E, xv);
  if constexpr (kAux) aux_token_fast<V>(a, xv, lane, E, colsum, counts, scratch);

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

  int my_e = 0;  // lane j holds the j-th pick
  float my_v = 0.0f;
  warp_topk<V>(int(c.topk), key, val, lane, scratch, &my_e, &my_v);

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

// Writes the block's partial aux statistics: partial[w][e] are the column sums of warp (or thread)
// w, added in w order so the result depends on the launch shape alone.
__device__ void store_block_aux(const AuxArgs& aux, int E, const float* partial, int nparts, const int* counts) {
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    float acc = 0.0f;
    for (int w = 0; w < nparts; ++w) acc += partial[w * E + e];
    aux.ws_colsum[int64_t(blockIdx.x) * E + e] = acc;
    aux.ws_counts[int64_t(blockIdx.x) * E + e] = counts[e];
  }
}

// Dynamic shared memory of the warp path: bias [E], then for the aux variant counts [E] and the
// warps' column sums [kWarpsPerBlock, E].
template <class In, int V, bool kAux>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_fast_kernel(RouteConfig c, const typename In::storage* __restrict__ x, BiasLoader bias, int64_t T, int lpg,
                      float* __restrict__ w, int32_t* __restrict__ idx, AuxArgs aux) {
  extern __shared__ float smem[];
  __shared__ FastScratch scratch[kWarpsPerBlock];
  const int E = int(c.num_experts);
  float* sbias = smem;
  int* counts = reinterpret_cast<int*>(smem + E);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    sbias[e] = bias(e);  // converted once per block
    if constexpr (kAux) counts[e] = 0;
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  float colsum[V] = {};
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + warp; t < T; t += stride)
    route_token_fast<In, V, kAux>(c, aux.cfg, x + t * E, sbias, lane, lpg, scratch[warp], colsum, counts,
                                  w + t * c.topk, idx + t * c.topk);
  if constexpr (kAux) {
    float* partial = smem + 2 * E;
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (lane * V + i < E) partial[warp * E + lane * V + i] = colsum[i];
    store_block_aux(aux, E, partial, kWarpsPerBlock, counts);
  }
}

// ------------------------------------------------------- one thread per token
// For E <= 32 a warp would idle most lanes: each thread routes a whole token from registers.
template <class In, int V>
__device__ void load_row(const typename In::storage* row, int E, float (&xv)[V]) {
  using S = typename In::storage;
  constexpr int kBytes = V * int(sizeof(S));
  if constexpr (kBytes % 16 == 0) {
    if (E == V) {  // then every row starts 16-byte aligned
      alignas(16) S buf[V];
#pragma unroll
      for (int c = 0; c < kBytes / 16; ++c)
        reinterpret_cast<uint4*>(buf)[c] = __ldg(reinterpret_cast<const uint4*>(row) + c);
#pragma unroll
      for (int i = 0; i < V; ++i) xv[i] = In::to_float(buf[i]);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) xv[i] = i < E ? In::to_float(row[i]) : 0.0f;
}

// Index of the best key (kExcluded once taken), which it then marks taken.
template <int V>
__device__ int take_best(uint32_t (&key)[V]) {
  uint32_t bk = kExcluded;
  int bi = 0;
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (key[i] > bk) bk = key[i], bi = i;
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (i == bi) key[i] = kExcluded;
  return bi;
}

template <int V>
__device__ void aux_token_thread(const AuxConfig& a, const float (&xv)[V], int E, float (&colsum)[V], int* counts) {
  const bool softmax = a.score_function == ScoreFunction::kSoftmax;
  float mx = -INFINITY;
  if (softmax)
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (i < E) mx = fmaxf(mx, xv[i]);
  float num[V], total = 0.0f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    num[i] = i < E ? (softmax ? expf(xv[i] - mx) : elementwise_score(a.score_function, xv[i])) : 0.0f;
    total += num[i];
  }
  const float denom = softmax ? total : total + kEps;  // as CleanStats
  uint32_t key[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const float s = num[i] / denom;
    if (i < E) colsum[i] += s;
    key[i] = i < E ? rank_key(s) : kExcluded;
  }
  for (int j = 0; j < a.topk; ++j) atomicAdd(&counts[take_best<V>(key)], 1);
}

template <class In, int V, bool kAux>
__device__ void route_token_thread(const RouteConfig& c, const AuxConfig& a, const typename In::storage* row,
                                   const float* sbias, float (&colsum)[V], int* counts, float* w_out,
                                   int32_t* idx_out) {
  const int E = int(c.num_experts);
  float xv[V];
  load_row<In, V>(row, E, xv);
  if constexpr (kAux) aux_token_thread<V>(a, xv, E, colsum, counts);
  const bool softmax = c.score_function == ScoreFunction::kSoftmax;
  float mx = -INFINITY, sum = 0.0f;
  if (softmax) {
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (i < E) mx = fmaxf(mx, xv[i]);
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (i < E) sum += expf(xv[i] - mx);
  }
  uint32_t key[V];
  float val[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const float s = softmax ? expf(xv[i] - mx) / sum : elementwise_score(c.score_function, xv[i]);
    val[i] = carried_value(c, xv[i], s);
    key[i] = i < E ? rank_key(val[i] + sbias[i]) : kExcluded;
  }
  for (int j = 0; j < c.topk; ++j) {
    const int bi = take_best<V>(key);
    float bv = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (i == bi) bv = val[i];
    idx_out[j] = bi;
    w_out[j] = bv;
  }
  finalize_weights(c, w_out);  // re-reads the values this thread just wrote
}

template <class In, int V, bool kAux>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_thread_kernel(RouteConfig c, const typename In::storage* __restrict__ x, BiasLoader bias, int64_t T,
                        float* __restrict__ w, int32_t* __restrict__ idx, AuxArgs aux) {
  constexpr int kThreads = kWarpsPerBlock * 32;
  __shared__ float sbias[V];
  __shared__ int counts[V];
  __shared__ float partial[kAux ? kThreads * V : 1];  // partial[thread][expert], read expert-major below
  if (threadIdx.x < V) {
    sbias[threadIdx.x] = threadIdx.x < c.num_experts ? bias(threadIdx.x) : 0.0f;
    counts[threadIdx.x] = 0;
  }
  __syncthreads();
  float colsum[V] = {};
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < T; t += stride)
    route_token_thread<In, V, kAux>(c, aux.cfg, x + t * c.num_experts, sbias, colsum, counts, w + t * c.topk,
                                    idx + t * c.topk);
  if constexpr (kAux) {
    // Stored expert-major ([expert][thread]) so that each thread below adds one expert's column
    // sums over the block's threads in thread order.
#pragma unroll
    for (int i = 0; i < V; ++i) partial[i * kThreads + threadIdx.x] = colsum[i];
    __syncthreads();
    for (int e = threadIdx.x; e < c.num_experts; e += blockDim.x) {
      float acc = 0.0f;
      for (int t = 0; t < kThreads; ++t) acc += partial[e * kThreads + t];
      aux.ws_colsum[int64_t(blockIdx.x) * c.num_experts + e] = acc;
      aux.ws_counts[int64_t(blockIdx.x) * c.num_experts + e] = counts[e];
    }
  }
}

// --------------------------------------------------------------- generic path
// Per-warp shared memory: key[E], val[E], gkey[G], and for the aux variant colsum[E], counts[E].
template <class In, bool kAux>
__global__ void route_generic_kernel(RouteConfig c, const typename In::storage* __restrict__ x, BiasLoader bias,
                                     int64_t T, int warps_per_block, float* __restrict__ w,
                                     int32_t* __restrict__ idx, AuxArgs aux) {
  extern __shared__ uint32_t scratch[];
  const int64_t E = c.num_experts, per_warp = 2 * E + c.num_groups + (kAux ? 2 * E : 0);
  const int warp = threadIdx.x / 32;
  uint32_t* mine = scratch + warp * per_warp;
  const RouteScratch s{mine, reinterpret_cast<float*>(mine + E), mine + 2 * E};
  float* colsum = reinterpret_cast<float*>(mine + 2 * E + c.num_groups);
  int32_t* counts = reinterpret_cast<int32_t*>(colsum + E);
  const WarpLanes L{int(threadIdx.x & 31), kFullMask};
  if constexpr (kAux)
    for (int64_t e = L.lane; e < E; e += 32) colsum[e] = 0.0f, counts[e] = 0;
  const int64_t stride = int64_t(gridDim.x) * warps_per_block;
  for (int64_t t = int64_t(blockIdx.x) * warps_per_block + warp; t < T; t += stride) {
    route_row<WarpLanes, In>(L, c, x + t * E, bias, s, w + t * c.topk, idx + t * c.topk);
    if constexpr (kAux) aux_stats_row<WarpLanes, In>(L, aux.cfg, x + t * E, E, colsum, counts);
    __syncwarp();  // the next token reuses the scratch
  }
  if constexpr (kAux) {
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      float acc = 0.0f;
      int32_t n = 0;
      for (int wi = 0; wi < warps_per_block; ++wi) {
        const uint32_t* theirs = scratch + wi * per_warp + 2 * E + c.num_groups;
        acc += reinterpret_cast<const float*>(theirs)[e];
        n += reinterpret_cast<const int32_t*>(theirs + E)[e];
      }
      aux.ws_colsum[int64_t(blockIdx.x) * E + e] = acc;
      aux.ws_counts[int64_t(blockIdx.x) * E + e] = n;
    }
  }
}

// Adds the blocks' partial aux statistics in a fixed order: one warp per expert, lane l adding the
// partials of blocks l, l + 32, ... (independent loads in flight), then a fixed butterfly.
__global__ void aux_finalize_kernel(const float* __restrict__ ws_colsum, const int32_t* __restrict__ ws_counts,
                                    int64_t blocks, int64_t E, float* __restrict__ colsum,
                                    int32_t* __restrict__ counts) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t e = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; e < E; e += warps) {
    float acc = 0.0f;
    int32_t n = 0;
#pragma unroll 8
    for (int64_t b = lane; b < blocks; b += 32) acc += ws_colsum[b * E + e], n += ws_counts[b * E + e];
    for (int off = 16; off; off >>= 1) {
      acc += __shfl_xor_sync(kFullMask, acc, off);
      n += __shfl_xor_sync(kFullMask, n, off);
    }
    if (lane == 0) colsum[e] = acc, counts[e] = n;
  }
}

// ------------------------------------------------------------------ backward
// Zeros a row with 16-byte stores where its alignment allows (the bits of +0.0 are zero).
template <class S>
__device__ void zero_row(S* row, int64_t n, int lane) {
  constexpr int kPerVector = 16 / sizeof(S);
  if (n % kPerVector == 0 && reinterpret_cast<uintptr_t>(row) % 16 == 0) {
    for (int64_t i = lane; i < n / kPerVector; i += 32) reinterpret_cast<uint4*>(row)[i] = make_uint4(0, 0, 0, 0);
  } else {
    for (int64_t e = lane; e < n; e += 32) row[e] = S(0);
  }
}

template <class In, bool kAux>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_bwd_kernel(RouteConfig c, ScoreFunction aux_f, const typename In::storage* __restrict__ x,
                     const int32_t* __restrict__ idx, const float* __restrict__ dw, const float* __restrict__ dscale,
                     typename In::storage* __restrict__ dx, int64_t T) {
  const WarpLanes L{int(threadIdx.x & 31), kFullMask};
  const int64_t E = c.num_experts, k = c.topk, stride = int64_t(gridDim.x) * kWarpsPerBlock;
  const bool sparse = !kAux && !(c.score_function == ScoreFunction::kSoftmax && c.use_pre_softmax);
  for (int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; t < T; t += stride) {
    const auto* xr = x + t * E;
    const int32_t* ir = idx + t * k;
    const float* dwr = dw + t * k;
    auto* dxr = dx + t * E;
    if constexpr (kAux) {
      route_aux_bwd_row<WarpLanes, In>(L, c, aux_f, xr, ir, dwr, dscale, dxr);
    } else if (sparse) {  // only the chosen experts get a gradient: zero the row, then write them
      const RouteRowGrad<In> r = route_row_grad<WarpLanes, In>(L, c, xr, ir, dwr);
      zero_row(dxr, E, L.lane);
      __syncwarp();
      for (int64_t j = L.lane; j < k; j += 32)
        if (r.chosen_valid(j)) dxr[ir[j]] = In::from_float(r.chosen(j));
    } else {
      route_bwd_row<WarpLanes, In>(L, c, xr, ir, dwr, dxr);
    }
    __syncwarp();
  }
}

// Rows of at most 32 experts: one thread per token, like the forward.
template <class In, bool kAux>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_bwd_thread_kernel(RouteConfig c, ScoreFunction aux_f, const typename In::storage* __restrict__ x,
                            const int32_t* __restrict__ idx, const float* __restrict__ dw,
                            const float* __restrict__ dscale, typename In::storage* __restrict__ dx, int64_t T) {
  const int64_t E = c.num_experts, k = c.topk, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < T; t += stride) {
    if constexpr (kAux)
      route_aux_bwd_row<SerialLanes, In>(SerialLanes{}, c, aux_f, x + t * E, idx + t * k, dw + t * k, dscale,
                                         dx + t * E);
    else
      route_bwd_row<SerialLanes, In>(SerialLanes{}, c, x + t * E, idx + t * k, dw + t * k, dx + t * E);
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

ffi::Error launch_status(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jax_moe: ") + what + ": " + cudaGetErrorString(err));
}

// Experts per lane for the warp path, or 0 when E is too large for registers.
int fast_lane_width(int64_t E) {
  for (int v = 1; v <= kMaxFastV; v *= 2)
    if (32 * v >= E) return v;
  return 0;
}

// Lanes per group for the warp path: 0 without groups, -1 when groups do not fit lane segments.
int fast_lanes_per_group(const RouteConfig& c, int V) {
  if (c.num_groups == 0) return 0;
  const int64_t gs = c.group_size();
  if (gs % V) return -1;
  const int64_t lpg = gs / V;
  return (lpg <= 32 && (lpg & (lpg - 1)) == 0) ? int(lpg) : -1;
}

// One forward launch: the kernel, its grid (fixed by the workspace for the aux variant, whose
// per-block partials must not depend on the device) and its stream.
struct Launch {
  cudaStream_t stream;
  DeviceLimits dev;
  const AuxArgs* aux;   // null: plain routing
  int64_t aux_blocks;   // the workspace's block count

  // Blocks handling tokens_per_block tokens each, capped so blocks stay resident and loop.
  unsigned grid(int64_t tokens, int tokens_per_block) const {
    if (aux) return unsigned(aux_blocks);
    const int64_t blocks = (tokens + tokens_per_block - 1) / tokens_per_block;
    return unsigned(std::min<int64_t>(blocks, int64_t(dev.sm_count) * 16));
  }
};

template <class In, int V, bool kAux>
void launch_thread(const Launch& l, const RouteConfig& c, const void* x, BiasLoader bias, int64_t T, float* w,
                   int32_t* idx) {
  route_thread_kernel<In, V, kAux><<<l.grid(T, kWarpsPerBlock * 32), kWarpsPerBlock * 32, 0, l.stream>>>(
      c, static_cast<const typename In::storage*>(x), bias, T, w, idx, kAux ? *l.aux : AuxArgs{});
}

template <class In, int V, bool kAux>
void launch_fast(const Launch& l, const RouteConfig& c, const void* x, BiasLoader bias, int64_t T, int lpg, float* w,
                 int32_t* idx) {
  const size_t smem = c.num_experts * sizeof(float) * (kAux ? 2 + kWarpsPerBlock : 1);
  route_fast_kernel<In, V, kAux><<<l.grid(T, kWarpsPerBlock), kWarpsPerBlock * 32, smem, l.stream>>>(
      c, static_cast<const typename In::storage*>(x), bias, T, lpg, w, idx, kAux ? *l.aux : AuxArgs{});
}

// Calls f.template operator()<V>() for V in {1, 2, 4, ..., 32}.
template <class F>
void dispatch_lane_width(int V, F&& f) {
  switch (V) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 4: f.template operator()<4>(); break;
    case 8: f.template operator()<8>(); break;
    case 16: f.template operator()<16>(); break;
    default: f.template operator()<32>(); break;
  }
}

template <class In, bool kAux>
ffi::Error route_fwd_typed(const Launch& l, const RouteConfig& c, const void* x, BiasLoader bias, int64_t T, float* w,
                           int32_t* idx) {
  const bool aux_fits_warp = !kAux || l.aux->cfg.topk <= kMaxFastTopk;
  if (c.num_experts <= 32 && c.num_groups == 0) {
    // The smallest power of two >= E.
    dispatch_lane_width(fast_lane_width(32 * c.num_experts),
                        [&]<int V>() { launch_thread<In, V, kAux>(l, c, x, bias, T, w, idx); });
    return launch_status("route forward (thread per token)");
  }
  const int V = fast_lane_width(c.num_experts);
  const int lpg = V ? fast_lanes_per_group(c, V) : -1;
  if (V && lpg >= 0 && c.topk <= kMaxFastTopk && aux_fits_warp) {
    dispatch_lane_width(V, [&]<int W>() { launch_fast<In, W, kAux>(l, c, x, bias, T, lpg, w, idx); });
    return launch_status("route forward (warp per token)");
  }
  const size_t per_warp = (2 * c.num_experts + c.num_groups + (kAux ? 2 * c.num_experts : 0)) * sizeof(uint32_t);
  if (per_warp > size_t(l.dev.smem_optin))
    return invalid("num_experts=" + std::to_string(c.num_experts) + " exceeds the shared memory of this GPU");
  const int warps = int(std::min<size_t>(4, l.dev.smem_optin / per_warp));
  const size_t bytes = per_warp * warps;
  cudaFuncSetAttribute(route_generic_kernel<In, kAux>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  route_generic_kernel<In, kAux><<<l.grid(T, warps), warps * 32, bytes, l.stream>>>(
      c, static_cast<const typename In::storage*>(x), bias, T, warps, w, idx, kAux ? *l.aux : AuxArgs{});
  return launch_status("route forward (generic path)");
}

// ------------------------------------------------------------------ handlers
ffi::Error route_fwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer logits, ffi::AnyBuffer bias,
                     ffi::Result<ffi::AnyBuffer> weights, ffi::Result<ffi::AnyBuffer> indices, int64_t topk,
                     int64_t score_function, bool pre, int64_t num_groups, int64_t group_topk,
                     int64_t group_score_topn, bool renormalize, float scaling_factor) {
  auto checked = check_route_fwd(logits, bias, *weights, *indices,
                                 make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                   group_score_topn, renormalize, scaling_factor));
  if (checked.has_error()) return checked.error();
  const RouteFwdBuffers& b = *checked;
  if (b.tokens == 0) return ffi::Error::Success();
  const Launch l{stream, device_limits(device), nullptr, 0};
  return dispatch_float(b.logits_dtype, [&]<class In>() {
    return route_fwd_typed<In, false>(l, b.config, logits.untyped_data(), b.bias, b.tokens, b.weights, b.indices);
  });
}

ffi::Error route_aux_fwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer logits, ffi::AnyBuffer bias,
                         ffi::Result<ffi::AnyBuffer> weights, ffi::Result<ffi::AnyBuffer> indices,
                         ffi::Result<ffi::AnyBuffer> colsum, ffi::Result<ffi::AnyBuffer> counts,
                         ffi::Result<ffi::AnyBuffer> ws_colsum, ffi::Result<ffi::AnyBuffer> ws_counts, int64_t topk,
                         int64_t score_function, bool pre, int64_t num_groups, int64_t group_topk,
                         int64_t group_score_topn, bool renormalize, float scaling_factor, int64_t aux_topk,
                         int64_t aux_score_function) {
  auto checked = check_route_fwd(logits, bias, *weights, *indices,
                                 make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                   group_score_topn, renormalize, scaling_factor));
  if (checked.has_error()) return checked.error();
  const RouteFwdBuffers& b = *checked;
  auto aux_checked = check_route_aux_outputs(b.config.num_experts, aux_topk, aux_score_function, *colsum, *counts,
                                             *ws_colsum, *ws_counts);
  if (aux_checked.has_error()) return aux_checked.error();
  const int64_t E = b.config.num_experts, blocks = *aux_checked;
  float* cs = colsum->typed_data<float>();
  int32_t* cn = counts->typed_data<int32_t>();
  if (b.tokens == 0 || blocks == 0) {
    cudaMemsetAsync(cs, 0, E * sizeof(float), stream);
    cudaMemsetAsync(cn, 0, E * sizeof(int32_t), stream);
    return launch_status("route_with_aux_loss forward (no tokens)");
  }
  const AuxArgs aux{{aux_topk, ScoreFunction(aux_score_function)},
                    ws_colsum->typed_data<float>(),
                    ws_counts->typed_data<int32_t>()};
  const Launch l{stream, device_limits(device), &aux, blocks};
  const ffi::Error routed = dispatch_float(b.logits_dtype, [&]<class In>() {
    return route_fwd_typed<In, true>(l, b.config, logits.untyped_data(), b.bias, b.tokens, b.weights, b.indices);
  });
  if (routed.failure()) return routed;
  const unsigned warps_per_block = 8, grid = unsigned(std::min<int64_t>((E + warps_per_block - 1) / warps_per_block,
                                                                        int64_t(l.dev.sm_count) * 16));
  aux_finalize_kernel<<<grid, warps_per_block * 32, 0, stream>>>(aux.ws_colsum, aux.ws_counts, blocks, E, cs, cn);
  return launch_status("route_with_aux_loss forward (statistics)");
}

template <bool kAux>
ffi::Error launch_route_bwd(cudaStream_t stream, int32_t device, const RouteBwdBuffers& b, ScoreFunction aux_f,
                            const float* dscale) {
  if (b.tokens == 0) return ffi::Error::Success();
  const DeviceLimits dev = device_limits(device);
  const bool per_thread = b.config.num_experts <= 32;
  const int tokens_per_block = per_thread ? kWarpsPerBlock * 32 : kWarpsPerBlock;
  const unsigned grid = unsigned(
      std::min<int64_t>((b.tokens + tokens_per_block - 1) / tokens_per_block, int64_t(dev.sm_count) * 16));
  return dispatch_float(b.logits_dtype, [&]<class In>() {
    using S = typename In::storage;
    const auto* x = static_cast<const S*>(b.logits);
    auto* dx = static_cast<S*>(b.dlogits);
    if (per_thread)
      route_bwd_thread_kernel<In, kAux><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
          b.config, aux_f, x, b.indices, b.dweights, dscale, dx, b.tokens);
    else
      route_bwd_kernel<In, kAux><<<grid, kWarpsPerBlock * 32, 0, stream>>>(b.config, aux_f, x, b.indices,
                                                                           b.dweights, dscale, dx, b.tokens);
    return launch_status("route backward");
  });
}

ffi::Error route_bwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer logits, ffi::AnyBuffer indices,
                     ffi::AnyBuffer dweights, ffi::Result<ffi::AnyBuffer> dlogits, int64_t topk,
                     int64_t score_function, bool pre, int64_t num_groups, int64_t group_topk,
                     int64_t group_score_topn, bool renormalize, float scaling_factor) {
  auto checked = check_route_bwd(logits, indices, dweights, *dlogits,
                                 make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                   group_score_topn, renormalize, scaling_factor));
  if (checked.has_error()) return checked.error();
  return launch_route_bwd<false>(stream, device, *checked, ScoreFunction::kSoftmax, nullptr);
}

ffi::Error route_aux_bwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer logits, ffi::AnyBuffer indices,
                         ffi::AnyBuffer dweights, ffi::AnyBuffer dscale, ffi::Result<ffi::AnyBuffer> dlogits,
                         int64_t topk, int64_t score_function, bool pre, int64_t num_groups, int64_t group_topk,
                         int64_t group_score_topn, bool renormalize, float scaling_factor,
                         int64_t aux_score_function) {
  auto checked = check_route_bwd(logits, indices, dweights, *dlogits,
                                 make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                   group_score_topn, renormalize, scaling_factor));
  if (checked.has_error()) return checked.error();
  if (auto err = check_aux_dscale(checked->config.num_experts, aux_score_function, dscale)) return *err;
  return launch_route_bwd<true>(stream, device, *checked, ScoreFunction(aux_score_function),
                                dscale.typed_data<float>());
}

}  // namespace

#define JAX_MOE_CUDA_CTX .Ctx<ffi::PlatformStream<cudaStream_t>>().Ctx<ffi::DeviceOrdinal>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_fwd_cuda, route_fwd,
                              bind_route_attrs(ffi::Ffi::Bind() JAX_MOE_CUDA_CTX
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_bwd_cuda, route_bwd,
                              bind_route_attrs(ffi::Ffi::Bind() JAX_MOE_CUDA_CTX
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_aux_fwd_cuda, route_aux_fwd,
                              bind_route_attrs(ffi::Ffi::Bind() JAX_MOE_CUDA_CTX
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>())
                                  .Attr<int64_t>("aux_topk")
                                  .Attr<int64_t>("aux_score_function"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_aux_bwd_cuda, route_aux_bwd,
                              bind_route_attrs(ffi::Ffi::Bind() JAX_MOE_CUDA_CTX
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>())
                                  .Attr<int64_t>("aux_score_function"),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_moe
