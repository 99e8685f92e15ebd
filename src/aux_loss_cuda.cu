// CUDA handlers of the aux-loss primitives.
//
// Row kernels (scores, their backward, the fused logits loss and its backward) run the shared row
// algorithms of aux_loss_row.h with a group of W lanes per token row (W = row_lanes(E): a warp for rows
// of 32 or more 16-byte chunks, down to 4 lanes, so short rows keep all lanes busy; the scores kernel
// always uses a warp), 8 warps a block, reading rows with 16-byte loads: the loss forward in one pass
// over the logits, the backwards in two (statistics, then d logits). The logits backward reads each row
// from memory once, keeping a copy between its two walks (registers, or a block's shared memory).
// Counts: rows of up to kSharedRowExperts experts count into a per-block shared-memory histogram
// flushed with integer atomics; longer rows use integer atomics on global memory. The counts are
// zeroed with cudaMemsetAsync first; integer atomics are exact, so counts are deterministic.
// The scores forward takes the routing kernels' segment layout instead where that is faster (E <= 256,
// or E <= 1024 with k <= 8; segment_scores_cuda.h): it selects a token's top k in a few shuffles.
// The probs loss's backward writes the same row of d probs on every token with 16-byte stores.
// Loss sums: one kernel runs both stages of aux_loss_row.h's deterministic sum. Stage-1 blocks write
// their partials to the workspace; the last block to finish (an integer atomic counter, zeroed with
// cudaMemsetAsync) adds all partials in a fixed order. The grid depends only on the shapes.
#include <cuda_runtime.h>

#include <cuda/atomic>
#include <cuda_pipeline.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "aux_loss_ffi.h"
#include "cuda_launch.h"
#include "handlers.h"
#include "lanes_cuda.cuh"
#include "segment_scores_cuda.h"

namespace jax_moe {
namespace {

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// ------------------------------------------------------- deterministic sum
// Block sum of one value per warp of the first kSumWarps warps (lane 0's), as the last step of the host
// replay block_sum_of_slots; the result is in warp 0. Every thread of the block must call it.
__device__ float combine_warps(float w) {
  __shared__ float ws[kSumWarps];
  const int warp = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31);
  if (lane == 0 && warp < kSumWarps) ws[warp] = w;
  __syncthreads();
  float v = 0.0f;
  if (warp == 0) v = warp_sum(lane < kSumWarps ? ws[lane] : 0.0f);
  __syncthreads();
  return v;
}

// Block sum of one value per thread of the first kSumThreads threads (block_sum_of_slots(v, 32)).
__device__ float block_sum_threads(float v) { return combine_warps(warp_sum(v)); }

// Where a loss kernel writes: buf = [coeff, coeff * total] and the loss (buf[1] in loss_dtype).
struct LossOut {
  float coeff;
  float* workspace;  // kSumWorkspace floats: partials, then the block counter
  float* buf;
  void* loss;
  Dtype loss_dtype;

  __device__ void write(float total) const {
    buf[0] = coeff;
    buf[1] = coeff * total;
    store_float(loss, 0, buf[1], loss_dtype);
  }
};

// Stage 1's end and stage 2: thread 0 holds this block's partial. The last block to finish adds all
// partials (host replay: sum_partials) and writes the outputs. The counter's acq_rel increment orders
// each block's partial before it and the last block's reads after it: no separate fences, which cost
// these short kernels ~0.4 µs (measured on an H100).
__device__ void finish_loss(float partial, const LossOut& out) {
  __shared__ bool last;
  if (threadIdx.x == 0) {
    out.workspace[blockIdx.x] = partial;
    cuda::atomic_ref<unsigned, cuda::thread_scope_device> counter(
        *reinterpret_cast<unsigned*>(out.workspace + kMaxSumBlocks));
    last = counter.fetch_add(1u, cuda::memory_order_acq_rel) == gridDim.x - 1;
  }
  __syncthreads();  // the other threads' reads follow thread 0's acquire
  if (!last) return;
  float acc = 0.0f;
#pragma unroll
  for (int r = 0; r < int(kMaxSumBlocks / kSumThreads); ++r) {
    const unsigned i = threadIdx.x + r * kSumThreads;
    if (i < gridDim.x) acc = acc + __ldcg(out.workspace + i);
  }
  const float total = block_sum_threads(acc);
  if (threadIdx.x == 0) out.write(total);
}

__global__ void empty_loss_kernel(LossOut out) { out.write(0.0f); }

// ----------------------------------------------------------------- kernels
// Row kernels: 8 warps a block; each warp works on 32 / W rows at a time, W lanes a row (row_lanes).
constexpr int kRowWarps = kSumWarps;
constexpr int kRowThreads = kSumThreads;

template <int W>
using RowGroup = RowGroupOf<W, kRowWarps>;

// Rows up to this many experts keep their scores' ranking keys in shared memory to rank from, and count
// into a shared histogram; longer rows rank from the scores in global memory and count with global
// atomics (contention is low with that many experts).
constexpr int64_t kSharedRowExperts = 1024;

template <class In>
__global__ void __launch_bounds__(kRowThreads)
    aux_scores_kernel(ScoreFunction f, int64_t k, const typename In::storage* __restrict__ x, int64_t T, int64_t E,
                      float* scores, int* counts) {
  using R = RowGroup<32>;
  const WarpLanes L = R::lanes();
  if (E > kSharedRowExperts) {
    for (int64_t t = R::first(); t < T; t += R::stride()) {
      aux_scores_row<WarpLanes, In>(L, f, k, x + t * E, E, scores + t * E, nullptr,
                                    [&](int64_t e) { atomicAdd(counts + e, 1); });
      __syncwarp();
    }
    return;
  }
  __shared__ int hist[kSharedRowExperts];
  __shared__ uint32_t rank_keys[kRowWarps][kSharedRowExperts];
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  uint32_t* mine = rank_keys[threadIdx.x >> 5];
  for (int64_t t = R::first(); t < T; t += R::stride()) {
    aux_scores_row<WarpLanes, In>(L, f, k, x + t * E, E, scores + t * E, mine,
                                  [&](int64_t e) { atomicAdd(hist + e, 1); });
    __syncwarp();  // the next row overwrites the keys
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x)
    if (hist[e]) atomicAdd(counts + e, hist[e]);
}

template <class In, int W>
__global__ void __launch_bounds__(kRowThreads)
    aux_scores_bwd_kernel(ScoreFunction f, const typename In::storage* __restrict__ x, const float* __restrict__ g,
                          int64_t T, int64_t E, typename In::storage* __restrict__ dx) {
  using R = RowGroup<W>;
  const auto L = R::lanes();
  for (int64_t t = R::first(); t < T; t += R::stride()) {
    const float* gt = g + t * E;
    clean_scores_bwd_row<GroupLanes<W>, In>(L, f, x + t * E, E, [&](int64_t e) { return gt[e]; }, dx + t * E);
  }
}

// Loads n consecutive elements starting at p, with one vector load when `vector` (then p is aligned).
template <class S, int N, bool kVector>
__device__ __forceinline__ void load_n(const S* __restrict__ p, S (&out)[N]) {
  if constexpr (kVector) {
    struct alignas(N * sizeof(S)) Pack {
      S v[N];
    };
    const Pack pk = *reinterpret_cast<const Pack*>(p);
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = pk.v[j];
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = p[j];
  }
}

// V consecutive elements stored at p, with one vector store when kVector (then p is aligned to it).
template <class S, int V, bool kVector>
__device__ __forceinline__ void store_n(S* __restrict__ p, const S (&v)[V]) {
  if constexpr (kVector) {
    struct alignas(V * sizeof(S)) Pack {
      S v[V];
    };
    Pack pk;
#pragma unroll
    for (int j = 0; j < V; ++j) pk.v[j] = v[j];
    *reinterpret_cast<Pack*>(p) = pk;
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) p[j] = v[j];
  }
}

// Stage 1 over probs: thread slot gid adds vectors gid, gid + slots, ... (aux_loss_row.h). Its column
// moves by col_step each time; when that is 0 (C divides slots * V, e.g. C a power of two) the
// thread's counts are loaded once. 8 blocks an SM: the largest grid, 1024 blocks, runs in one wave.
template <class In, int V, bool kVector>
__global__ void __launch_bounds__(kSumThreads, 8)
    aux_loss_kernel(const typename In::storage* __restrict__ p, Counts tpe, int64_t vectors, int64_t cols,
                    LossOut out) {
  using S = typename In::storage;
  const int64_t slots = int64_t(gridDim.x) * kSumThreads;
  const int64_t first = int64_t(blockIdx.x) * kSumThreads + threadIdx.x;
  const int64_t col_step = (slots * V) % cols;
  int64_t col = (first * V) % cols;
  const auto* w = static_cast<const float*>(tpe.data);
  float wv[V];
  const auto load_counts = [&] {
    load_n<float, V, kVector>(w + col, wv);
#pragma unroll
    for (int j = 0; j < V; ++j) wv[j] = tpe.convert(wv[j]);
  };
  if (col_step == 0 && first < vectors) load_counts();
  float acc = 0.0f;
#pragma unroll 4
  for (int64_t v = first; v < vectors; v += slots) {
    S pv[V];
    load_n<S, V, kVector>(p + v * V, pv);
    if (col_step != 0) load_counts();
#pragma unroll
    for (int j = 0; j < V; ++j) acc = add_product(acc, In::to_float(pv[j]), wv[j]);
    col += col_step;
    if (col >= cols) col -= cols;
  }
  finish_loss(block_sum_threads(acc), out);
}

// The aux loss's backward: d probs[t, c] = (buf[0] · g) · tpe[c] in probs' dtype, the same row on every
// token. A pure write of T·C elements as vectors of V elements (16 bytes where C allows; a vector never
// spans rows). Thread `first` writes vectors first, first + stride, ...; vector v holds columns
// (v · V) % C onwards. Its column moves by the same step each time: when that is 0, its converted piece
// of the row is computed once and only stored afterwards.
template <class In, int V, bool kVector>
__global__ void __launch_bounds__(kSumThreads, 8)
    aux_probs_bwd_kernel(Counts tpe, const float* __restrict__ buf, const float* __restrict__ g, int64_t vectors,
                         int64_t cols, typename In::storage* __restrict__ dprobs) {
  using S = typename In::storage;
  const ScaledCounts row{tpe, buf[0] * g[0]};
  const int64_t stride = int64_t(gridDim.x) * kSumThreads;
  const int64_t first = int64_t(blockIdx.x) * kSumThreads + threadIdx.x;
  const int64_t col_step = (stride * V) % cols;
  int64_t col = (first * V) % cols;
  S out[V];
  const auto row_piece = [&] {
    float w[V];
    weights_at(row, col, w);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = In::from_float(w[j]);
  };
  if (col_step == 0 && first < vectors) row_piece();
#pragma unroll 4
  for (int64_t v = first; v < vectors; v += stride) {
    if (col_step != 0) row_piece();
    store_n<S, V, kVector>(dprobs + v * V, out);
    col += col_step;
    if (col >= cols) col -= cols;
  }
}

// Weights of a row's elements converted once per block into shared memory: the forward's counts tpe[e]
// and the backward's d scores scale · tpe[e]. A chunk's weights are then 16-byte shared loads, where
// Counts takes two 16-byte L1 loads and a conversion per element (int32 counts: an I2F, on the
// quarter-rate pipe that the scores' exponentials also need). The same floats: results do not change.
struct SharedWeights {
  const float* w;  // [E], shared
};

template <int N>
__device__ void weights_at(const SharedWeights& v, int64_t e0, float (&w)[N]) {
  if constexpr (N % 4 == 0) {  // a chunk: e0 is a multiple of 4
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const float4 f = reinterpret_cast<const float4*>(v.w + e0)[q];
      w[4 * q] = f.x, w[4 * q + 1] = f.y, w[4 * q + 2] = f.z, w[4 * q + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) w[j] = v.w[e0 + j];
  }
}

// Fills w[0, E) with g(e), the block's threads together, and waits for all of them.
template <class G>
__device__ SharedWeights stage_weights(const G& g, int64_t E, float* w) {
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) w[e] = g(e);
  __syncthreads();
  return {w};
}

// g itself, or with kStaged, g staged in w (as stage_weights).
template <bool kStaged, class G>
__device__ auto staged_if(const G& g, int64_t E, float* w) {
  if constexpr (kStaged)
    return stage_weights(g, E, w);
  else
    return g;
}

// The most shared memory the forward's staged counts take (16-bit rows only). Measured on an H100
// (T = 16384, against the counts read per chunk): bf16 sigmoid E = 1024-4096 10-16% faster (the kernels
// no longer spill at 32 registers), sqrtsoftplus within 1%; softmax 7% faster at E = 1024 and 3%
// slower at E = 4096, hence half the room. float32 rows do not stage: their sigmoid kernels then spill
// and lose 10-20%, softmax moves within 2%.
constexpr int64_t staged_counts_bytes(ScoreFunction f) {
  return f == ScoreFunction::kSoftmax ? 8 * 1024 : 16 * 1024;
}

// Stage 1 of the fused loss: the warp (row slot) adds the row dots of rows slot, slot + slots, ...
// One instantiation per score function; kMinBlocks blocks an SM (8: 32 registers, one wave of the largest
// grid; see the launch for 6).
// A row group's sum is on all its lanes: the xor butterfly over the warp's groups (offsets 16 .. W) adds
// them as the host replay block_sum_of_slots does. With kStaged the block first stages the counts in
// dynamic shared memory (E floats; see staged_counts_bytes).
template <class In, ScoreFunction kF, int W, int kMinBlocks, bool kStaged>
__global__ void __launch_bounds__(kRowThreads, kMinBlocks)
    aux_logits_kernel(const typename In::storage* __restrict__ x, Counts tpe, int64_t T, int64_t E, LossOut out) {
  using R = RowGroup<W>;
  const auto L = R::lanes();
  extern __shared__ float4 staged_counts[];
  const auto counts = staged_if<kStaged>(tpe, E, reinterpret_cast<float*>(staged_counts));
  float acc = 0.0f;
  for (int64_t t = R::first(); t < T; t += R::stride())
    acc = acc + clean_dot<GroupLanes<W>, In>(L, kF, x + t * E, E, counts);
  for (int off = 16; off >= W; off >>= 1) acc += __shfl_xor_sync(kFullMask, acc, off);
  finish_loss(combine_warps(acc), out);
}

template <class In, int W>
__global__ void __launch_bounds__(kRowThreads)
    aux_logits_bwd_kernel(ScoreFunction f, const typename In::storage* __restrict__ x, Counts tpe,
                          const float* __restrict__ buf, const float* __restrict__ g, int64_t T, int64_t E,
                          typename In::storage* __restrict__ dx) {
  using R = RowGroup<W>;
  const auto L = R::lanes();
  const ScaledCounts dscores{tpe, buf[0] * g[0]};
  for (int64_t t = R::first(); t < T; t += R::stride())
    clean_scores_bwd_row<GroupLanes<W>, In>(L, f, x + t * E, E, dscores, dx + t * E);
}

// ------------------------------------------------- the logits backward's rows
// The block backward stages its d scores where they and its row copies take at most this much shared
// memory (bf16 E <= 4096, f32 E <= 2048): past it the block kernel loses occupancy.
constexpr int64_t kMaxStagedBlockBytes = 32 * 1024;

// The logits backward walks each row twice (its sums, then d logits) and reads it from memory once:
// rows of up to 8 chunks a lane of a warp are kept in registers (RowInRegisters, lanes_cuda.cuh),
// longer ones in the block's shared memory. A copy holds this lane's chunks only, so a lane reads back
// what it wrote. Both need a row of whole, 16-byte aligned chunks, and d logits aligned alike (the
// kernels pass known_aligned).
template <class Lanes, class In>
struct RowInShared {
  using S = typename In::storage;
  static constexpr int V = chunk_elems<S>();
  const Lanes& L;
  int64_t chunks;
  const uint4* copy;  // [chunks], shared, filled by start_copy

  // Starts copying this lane's chunks of row x to `shared` with cp.async, as one commit group: the
  // loads stay in flight while the block works on another row. They are there once the lane has waited
  // for the group (__pipeline_wait_prior).
  __device__ static void start_copy(const Lanes& L, const S* x, int64_t n, uint4* shared) {
    const auto* src = reinterpret_cast<const uint4*>(x);
    for (int64_t c = L.lane; c < n / V; c += L.nlanes) __pipeline_memcpy_async(shared + c, src + c, sizeof(uint4));
    __pipeline_commit();
  }

  __device__ RowInShared(const Lanes& lanes, int64_t n, const uint4* shared)
      : L(lanes), chunks(n / V), copy(shared) {}

  template <class F>
  __device__ void operator()(F f) const {
    for (int64_t c = L.lane; c < chunks; c += L.nlanes) {
      S v[V];
      load_chunk(reinterpret_cast<const S*>(copy + c), true, v);
      float xv[V];
#pragma unroll
      for (int j = 0; j < V; ++j) xv[j] = In::to_float(v[j]);
      f(c * V, xv);
    }
  }
};

// The whole block on one row (rows too long for a warp's registers): the Lanes policy's reductions (a
// warp butterfly, then the warps' results in warp order) through shared memory.
struct BlockLanes {
  int lane;
  float* partials;  // [kRowWarps], shared
  static constexpr int nlanes = kRowThreads;

  template <class Op>
  __device__ float reduce(float v, Op op) const {
    for (int off = 16; off; off >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, off));
    if ((lane & 31) == 0) partials[lane / 32] = v;
    __syncthreads();
    float r = partials[0];
    for (int w = 1; w < kRowWarps; ++w) r = op(r, partials[w]);
    __syncthreads();  // the next reduction reuses the partials
    return r;
  }
  __device__ float max(float v) const { return reduce(v, [](float a, float b) { return fmaxf(a, b); }); }
  __device__ float sum(float v) const { return reduce(v, [](float a, float b) { return a + b; }); }
};

// The logits backward for rows of up to 8 chunks a lane: W lanes a row (a group of a warp's lanes), R
// chunks a lane, in registers; the d scores staged in dynamic shared memory (E floats, at most 8 KB).
template <class In, int W, int R>
__global__ void __launch_bounds__(kRowThreads)
    aux_logits_bwd_registers_kernel(ScoreFunction f, const typename In::storage* __restrict__ x, Counts tpe,
                                    const float* __restrict__ buf, const float* __restrict__ g, int64_t T,
                                    int64_t E, typename In::storage* __restrict__ dx) {
  using Rows = RowGroup<W>;
  const auto L = Rows::lanes();
  extern __shared__ float4 staged[];  // [E] floats
  const SharedWeights dscores =
      stage_weights(ScaledCounts{tpe, buf[0] * g[0]}, E, reinterpret_cast<float*>(staged));
  for (int64_t t = Rows::first(); t < T; t += Rows::stride())
    clean_scores_bwd_of<GroupLanes<W>, In>(L, f, RowInRegisters<GroupLanes<W>, In, R>(L, x + t * E, E), dscores,
                                           dx + t * E, true);
}

// The logits backward for longer rows: a block a row. Rows of aligned chunks are copied to dynamic shared
// memory with cp.async, every chunk of a lane in flight at once, into one of kCopies buffers: with 2, the
// next row's copy is in flight while the block works on this one. Other rows (kCopies = 0: not made of
// aligned chunks, or too long) take two passes over memory, of which the second hits L2 often. With
// kStaged, the d scores are staged after the copies.
template <class In, int kCopies, bool kStaged>
__global__ void __launch_bounds__(kRowThreads)
    aux_logits_bwd_block_kernel(ScoreFunction f, const typename In::storage* __restrict__ x, Counts tpe,
                                const float* __restrict__ buf, const float* __restrict__ g, int64_t T, int64_t E,
                                typename In::storage* __restrict__ dx) {
  using Row = RowInShared<BlockLanes, In>;
  extern __shared__ uint4 row_copy[];
  __shared__ float partials[kRowWarps];
  const BlockLanes L{int(threadIdx.x), partials};
  const auto dscores = staged_if<kStaged>(ScaledCounts{tpe, buf[0] * g[0]}, E,
                                          reinterpret_cast<float*>(row_copy + kCopies * (E / Row::V)));
  if constexpr (kCopies == 0) {
    for (int64_t t = blockIdx.x; t < T; t += gridDim.x)
      clean_scores_bwd_row<BlockLanes, In>(L, f, x + t * E, E, dscores, dx + t * E);
    return;
  }
  const int64_t chunks = E / Row::V;
  int64_t t = blockIdx.x;
  if (t < T) Row::start_copy(L, x + t * E, E, row_copy);
  for (int copy = 0; t < T; t += gridDim.x, copy = (copy + 1) % kCopies) {
    const int64_t next = t + gridDim.x;
    if (kCopies == 2 && next < T) {  // the next row's copy goes in flight before this row's use
      Row::start_copy(L, x + next * E, E, row_copy + (copy ^ 1) * chunks);
      __pipeline_wait_prior(1);
    } else {
      __pipeline_wait_prior(0);
    }
    clean_scores_bwd_of<BlockLanes, In>(L, f, Row(L, E, row_copy + copy * chunks), dscores, dx + t * E, true);
    if (kCopies == 1 && next < T) Row::start_copy(L, x + next * E, E, row_copy);  // this lane read its chunks
  }
}

// ------------------------------------------------------------------ launch
// Runs f.template operator()<W>() for W = row_lanes(experts, elem_bytes).
template <class F>
ffi::Error dispatch_row_lanes(int64_t experts, int64_t elem_bytes, F&& f) {
  switch (row_lanes(experts, elem_bytes)) {
    case 4: return f.template operator()<4>();
    case 8: return f.template operator()<8>();
    case 16: return f.template operator()<16>();
    default: return f.template operator()<32>();
  }
}

ffi::Error aux_scores_fwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer logits, ffi::Result<ffi::AnyBuffer> scores,
                          ffi::Result<ffi::AnyBuffer> counts, int64_t topk, int64_t score_function) {
  auto shapes = check_aux_scores_fwd(logits, *scores, *counts, topk, score_function);
  if (shapes.has_error()) return shapes.error();
  const RowShapes s = *shapes;
  int* count = counts->typed_data<int32_t>();
  if (cudaMemsetAsync(count, 0, s.experts * sizeof(int32_t), stream) != cudaSuccess)
    return launch_status("aux scores (zeroing the counts)");
  if (s.tokens == 0) return ffi::Error::Success();
  float* out = scores->typed_data<float>();
  if (aux_scores_on_segments(s.experts, topk))
    return aux_scores_segments(stream, device, s.dtype, s.f, topk, logits.untyped_data(), s.tokens, s.experts,
                               out, count);
  const unsigned grid = RowGroup<32>::grid(s.tokens, device_limits(device).sm_count, 4);
  return dispatch_float(s.dtype, [&]<class In>() {
    aux_scores_kernel<In><<<grid, kRowThreads, 0, stream>>>(
        s.f, topk, static_cast<const typename In::storage*>(logits.untyped_data()), s.tokens, s.experts, out, count);
    return launch_status("aux scores");
  });
}

ffi::Error aux_scores_bwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer logits, ffi::AnyBuffer dscores,
                          ffi::Result<ffi::AnyBuffer> dlogits, int64_t score_function) {
  auto shapes = check_aux_scores_bwd(logits, dscores, *dlogits, score_function);
  if (shapes.has_error()) return shapes.error();
  const RowShapes s = *shapes;
  if (s.tokens == 0) return ffi::Error::Success();
  const int sms = device_limits(device).sm_count;
  return dispatch_float(s.dtype, [&]<class In>() {
    using S = typename In::storage;
    return dispatch_row_lanes(s.experts, sizeof(S), [&]<int W>() {
      aux_scores_bwd_kernel<In, W><<<RowGroup<W>::grid(s.tokens, sms, 8), kRowThreads, 0, stream>>>(
          s.f, static_cast<const S*>(logits.untyped_data()), dscores.typed_data<float>(), s.tokens, s.experts,
          static_cast<S*>(dlogits->untyped_data()));
      return launch_status("aux scores backward");
    });
  });
}

// Zeroes the workspace's block counter; with no blocks, writes the outputs directly.
ffi::Error start_loss(cudaStream_t stream, int64_t blocks, const LossOut& out) {
  if (blocks == 0) {
    empty_loss_kernel<<<1, 1, 0, stream>>>(out);
    return launch_status("aux loss (no tokens)");
  }
  if (cudaMemsetAsync(out.workspace + kMaxSumBlocks, 0, sizeof(unsigned), stream) != cudaSuccess)
    return launch_status("aux loss (zeroing the block counter)");
  return ffi::Error::Success();
}

template <class In, int V>
void launch_loss(cudaStream_t stream, const ProbsShapes& s, const void* p, const LossOut& out) {
  using S = typename In::storage;
  const auto aligned = [](const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; };
  const bool vector = aligned(p, V * sizeof(S)) && aligned(s.tpe.data, V * sizeof(float));
  auto kernel = vector ? aux_loss_kernel<In, V, true> : aux_loss_kernel<In, V, false>;
  kernel<<<unsigned(s.blocks), kSumThreads, 0, stream>>>(static_cast<const S*>(p), s.tpe, s.vectors, s.cols, out);
}

ffi::Error aux_loss_fwd(cudaStream_t stream, ffi::AnyBuffer probs, ffi::AnyBuffer tpe, ffi::Result<ffi::AnyBuffer> loss,
                        ffi::Result<ffi::AnyBuffer> buf, ffi::Result<ffi::AnyBuffer> workspace, float coeff) {
  auto shapes = check_aux_loss_fwd(probs, tpe, *loss, *buf, *workspace);
  if (shapes.has_error()) return shapes.error();
  const ProbsShapes s = *shapes;
  const LossOut out{coeff, workspace->typed_data<float>(), buf->typed_data<float>(), loss->untyped_data(),
                    s.loss_dtype};
  if (auto err = start_loss(stream, s.blocks, out); !err.success() || s.blocks == 0) return err;
  return dispatch_float(s.dtype, [&]<class In>() {
    const void* p = probs.untyped_data();
    switch (s.vec) {
      case 8: launch_loss<In, 8>(stream, s, p, out); break;
      case 4: launch_loss<In, 4>(stream, s, p, out); break;
      case 2: launch_loss<In, 2>(stream, s, p, out); break;
      default: launch_loss<In, 1>(stream, s, p, out); break;
    }
    return launch_status("aux loss");
  });
}

// Launches the kernel with vectors of V elements, V = `width` (a power of two up to 16 bytes' worth).
template <class In, int V = int(16 / sizeof(typename In::storage))>
void launch_probs_bwd(cudaStream_t stream, int device, const ColumnShapes& s, int width, const float* buf,
                      const float* g, void* dprobs) {
  using S = typename In::storage;
  if constexpr (V > 1) {
    if (width < V) return launch_probs_bwd<In, V / 2>(stream, device, s, width, buf, g, dprobs);
  }
  const int64_t vectors = s.rows * s.cols / V;
  const int64_t blocks =
      std::min<int64_t>((vectors + kSumThreads - 1) / kSumThreads, int64_t(device_limits(device).sm_count) * 8);
  const bool vector = reinterpret_cast<uintptr_t>(dprobs) % (V * sizeof(S)) == 0;
  auto kernel = vector ? aux_probs_bwd_kernel<In, V, true> : aux_probs_bwd_kernel<In, V, false>;
  kernel<<<unsigned(blocks), kSumThreads, 0, stream>>>(s.tpe, buf, g, vectors, s.cols, static_cast<S*>(dprobs));
}

ffi::Error aux_loss_bwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer buf, ffi::AnyBuffer tpe, ffi::AnyBuffer g,
                        ffi::Result<ffi::AnyBuffer> dprobs) {
  auto shapes = check_aux_loss_bwd(buf, tpe, g, *dprobs);
  if (shapes.has_error()) return shapes.error();
  const ColumnShapes s = *shapes;
  if (s.rows == 0 || s.cols == 0) return ffi::Error::Success();
  return dispatch_float(s.dtype, [&]<class In>() {
    const int width = probs_vector_width(s.cols, sizeof(typename In::storage));
    launch_probs_bwd<In>(stream, device, s, width, buf.typed_data<float>(), g.typed_data<float>(),
                         dprobs->untyped_data());
    return launch_status("aux loss backward");
  });
}

ffi::Error aux_logits_fwd(cudaStream_t stream, ffi::AnyBuffer logits, ffi::AnyBuffer tpe,
                          ffi::Result<ffi::AnyBuffer> loss, ffi::Result<ffi::AnyBuffer> buf,
                          ffi::Result<ffi::AnyBuffer> workspace, int64_t score_function, float coeff) {
  auto shapes = check_aux_logits_fwd(logits, tpe, *loss, *buf, *workspace, score_function);
  if (shapes.has_error()) return shapes.error();
  const RowShapes s = *shapes;
  const LossOut out{coeff, workspace->typed_data<float>(), buf->typed_data<float>(), loss->untyped_data(),
                    Dtype::kF32};
  return dispatch_float(s.dtype, [&]<class In>() {
    using S = typename In::storage;
    return dispatch_row_lanes(s.experts, sizeof(S), [&]<int W>() {
      // The plan of aux_loss_row.h: 32 / W row slots a warp.
      const int64_t blocks = sum_blocks(s.tokens, RowGroup<W>::kPerBlock);
      if (auto err = start_loss(stream, blocks, out); !err.success() || blocks == 0) return err;
      const auto launch = [&]<int kMinBlocks, bool kStaged>() {
        using F = ScoreFunction;
        auto kernel = s.f == F::kSoftmax   ? aux_logits_kernel<In, F::kSoftmax, W, kMinBlocks, kStaged>
                      : s.f == F::kSigmoid ? aux_logits_kernel<In, F::kSigmoid, W, kMinBlocks, kStaged>
                                           : aux_logits_kernel<In, F::kSqrtSoftplus, W, kMinBlocks, kStaged>;
        const size_t smem = kStaged ? size_t(s.experts) * sizeof(float) : 0;
        kernel<<<unsigned(blocks), kRowThreads, smem, stream>>>(static_cast<const S*>(logits.untyped_data()),
                                                                s.tpe, s.tokens, s.experts, out);
        return launch_status("aux loss from logits");
      };
      // 16-bit rows of at most a chunk a lane run at 6 blocks an SM (40 registers): at 8 these kernels
      // spill, which cost them 8-15% on an H100 (E = 64 and 256 bf16); longer rows lose more to the lower
      // occupancy than they gain.
      if constexpr (sizeof(S) == 2) {
        if (s.experts * int64_t(sizeof(S)) <= 16 * W) return launch.template operator()<6, false>();
        if (s.experts * int64_t(sizeof(float)) <= staged_counts_bytes(s.f))
          return launch.template operator()<8, true>();
      }
      return launch.template operator()<8, false>();
    });
  });
}

// Lanes a row (W, row_lanes) and chunks a lane (R <= 8) of aux_logits_bwd_registers_kernel; W = 0 where the
// row does not fit, or is not made of aligned 16-byte chunks.
struct RegisterLayout {
  int W = 0, R = 0;
};

RegisterLayout register_layout(int64_t E, int64_t elem_bytes, bool aligned) {
  if (!aligned) return {};
  const int W = row_lanes(E, elem_bytes);
  const int R = register_chunks(E * elem_bytes / 16, W);
  return R ? RegisterLayout{W, R} : RegisterLayout{};
}

// Runs f.template operator()<W, R>() for the layouts register_layout returns (below a warp, row_lanes
// picks W > chunks / 2, so R <= 2).
template <class F>
ffi::Error dispatch_register_layout(const RegisterLayout& c, F&& f) {
  const auto by_r = [&]<int W>() {
    switch (c.R) {
      case 1: return f.template operator()<W, 1>();
      case 2: return f.template operator()<W, 2>();
      case 4: if constexpr (W == 32) return f.template operator()<W, 4>();
      [[fallthrough]];
      default: if constexpr (W == 32) return f.template operator()<W, 8>();
               return ffi::Error::Internal("jax_moe: no register layout for the row");
    }
  };
  switch (c.W) {
    case 4: return by_r.template operator()<4>();
    case 8: return by_r.template operator()<8>();
    case 16: return by_r.template operator()<16>();
    default: return by_r.template operator()<32>();
  }
}

// The block kernel copies rows of up to 64 KB to shared memory (3 blocks an SM at the longest), two rows
// where they take at most 32 KB. Two copies of 32 KB rows cost more occupancy than they gain (H100, bf16
// E = 16384 fwd+bwd: 3-5% slower).
constexpr int64_t kMaxSharedRowBytes = 64 * 1024;
constexpr int64_t kMaxTwoCopiesBytes = 32 * 1024;

template <class In, int kCopies, bool kStaged>
ffi::Error launch_logits_bwd_block(cudaStream_t stream, int32_t device, const RowShapes& s, const void* x,
                                   const float* buf, const float* g, void* dx) {
  using S = typename In::storage;
  const size_t smem = size_t(s.experts) * (kCopies * sizeof(S) + (kStaged ? sizeof(float) : 0));
  const auto kernel = aux_logits_bwd_block_kernel<In, kCopies, kStaged>;
  // Past 48 KB with the kernel's static shared memory (its partials), a launch must opt in.
  if (smem > 47 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  // Each block loops over many rows, so the grid is one wave: with more blocks than fit at once, the
  // last of them run alone (8 an SM where 6 fit is 1.33 waves, run in the time of 2).
  int resident = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kRowThreads, smem);
  const int64_t blocks = int64_t(device_limits(device).sm_count) * std::max(resident, 1);
  const unsigned grid = unsigned(std::min<int64_t>(s.tokens, blocks));
  kernel<<<grid, kRowThreads, smem, stream>>>(s.f, static_cast<const S*>(x), s.tpe, buf, g, s.tokens, s.experts,
                                             static_cast<S*>(dx));
  return launch_status("aux loss from logits backward");
}

ffi::Error aux_logits_bwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer logits, ffi::AnyBuffer tpe,
                          ffi::AnyBuffer buf, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dlogits,
                          int64_t score_function) {
  auto shapes = check_aux_logits_bwd(logits, tpe, buf, g, *dlogits, score_function);
  if (shapes.has_error()) return shapes.error();
  const RowShapes s = *shapes;
  if (s.tokens == 0) return ffi::Error::Success();
  return dispatch_float(s.dtype, [&]<class In>() {
    using S = typename In::storage;
    const auto* x = static_cast<const S*>(logits.untyped_data());
    auto* dx = static_cast<S*>(dlogits->untyped_data());
    const auto* bf = buf.typed_data<float>();
    const auto* gf = g.typed_data<float>();
    const int64_t row_bytes = s.experts * int64_t(sizeof(S));
    const bool aligned = row_bytes % 16 == 0 && aligned16(x) && aligned16(dx);
    const int sms = device_limits(device).sm_count;
    if (const RegisterLayout layout = register_layout(s.experts, sizeof(S), aligned); layout.W) {
      return dispatch_register_layout(layout, [&]<int W, int R>() {
        aux_logits_bwd_registers_kernel<In, W, R><<<RowGroup<W>::grid(s.tokens, sms, 8), kRowThreads,
                                                    s.experts * sizeof(float), stream>>>(s.f, x, s.tpe, bf, gf,
                                                                                         s.tokens, s.experts, dx);
        return launch_status("aux loss from logits backward");
      });
    }
    if (aligned && 2 * row_bytes <= kMaxTwoCopiesBytes) {
      if (2 * row_bytes + s.experts * int64_t(sizeof(float)) <= kMaxStagedBlockBytes)
        return launch_logits_bwd_block<In, 2, true>(stream, device, s, x, bf, gf, dx);
      return launch_logits_bwd_block<In, 2, false>(stream, device, s, x, bf, gf, dx);
    }
    if (aligned && row_bytes <= kMaxSharedRowBytes)
      return launch_logits_bwd_block<In, 1, false>(stream, device, s, x, bf, gf, dx);
    if (row_bytes > 16 * 32)  // more than a chunk a lane of a warp
      return launch_logits_bwd_block<In, 0, false>(stream, device, s, x, bf, gf, dx);
    return dispatch_row_lanes(s.experts, sizeof(S), [&]<int W>() {
      aux_logits_bwd_kernel<In, W><<<RowGroup<W>::grid(s.tokens, sms, 8), kRowThreads, 0, stream>>>(
          s.f, x, s.tpe, bf, gf, s.tokens, s.experts, dx);
      return launch_status("aux loss from logits backward");
    });
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_aux_scores_fwd_cuda, aux_scores_fwd,
                              bind_stream_and_device()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("topk")
                                  .Attr<int64_t>("score_function"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_aux_scores_bwd_cuda, aux_scores_bwd,
                              bind_stream_and_device()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("score_function"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_aux_loss_fwd_cuda, aux_loss_fwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("coeff"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_aux_loss_bwd_cuda, aux_loss_bwd,
                              bind_stream_and_device()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_aux_logits_fwd_cuda, aux_logits_fwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("score_function")
                                  .Attr<float>("coeff"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_aux_logits_bwd_cuda, aux_logits_bwd,
                              bind_stream_and_device()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("score_function"),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_moe
