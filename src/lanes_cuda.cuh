// Lane policies of the shared row algorithms (routing_row.h) on CUDA: a group of W lanes of a warp.
// The host branches only exist to compile: these policies are used from device code.
#pragma once

#include "routing_row.h"

namespace jax_moe {

constexpr unsigned kFullMask = 0xffffffffu;

template <int W>
struct GroupLanes {
  int lane;       // within the group
  unsigned mask;  // the group's lanes
  static constexpr int nlanes = W;
  MOE_HD bool leader() const { return lane == 0; }
  MOE_HD void sync() const {
#ifdef __CUDA_ARCH__
    __syncwarp(mask);
#endif
  }
  MOE_HD float max(float v) const {
#ifdef __CUDA_ARCH__
    for (int off = W / 2; off; off >>= 1) v = fmaxf(v, __shfl_xor_sync(mask, v, off));
#endif
    return v;
  }
  MOE_HD float sum(float v) const {
#ifdef __CUDA_ARCH__
    for (int off = W / 2; off; off >>= 1) v += __shfl_xor_sync(mask, v, off);
#endif
    return v;
  }
  MOE_HD Cand best(Cand c) const {
#ifdef __CUDA_ARCH__
    for (int off = W / 2; off; off >>= 1) {
      const Cand o{__shfl_xor_sync(mask, c.key, off), __shfl_xor_sync(mask, c.idx, off)};
      if (before(o, c)) c = o;
    }
#endif
    return c;
  }
};

// A whole warp: {lane, kFullMask}.
using WarpLanes = GroupLanes<32>;

#ifdef __CUDACC__
// The S lanes (a power of two) of one segment of a warp. The warp's 32 / S segments run in lock
// step, each on its own data, so every shuffle names the full warp and stays inside its segment.
template <int S>
struct SegmentLanes {
  int lane;  // in the warp
  int sl;    // in the segment

  __device__ explicit SegmentLanes(int warp_lane) : lane(warp_lane), sl(warp_lane & (S - 1)) {}
  __device__ int segment() const { return lane / S; }
  __device__ int base() const { return lane - sl; }

  template <class T>
  __device__ T shfl(T v, int seg_lane) const { return __shfl_sync(kFullMask, v, base() + seg_lane); }
  // A whole warp reduces with one redux.sync (sm_80+), where the shuffle butterfly takes 5 dependent
  // rounds (the k rounds of candidate_threshold are a chain of these). Not for smaller segments: redux
  // writes a warp-uniform register, so the compiler loops over the segments.
  __device__ uint32_t max(uint32_t v) const {
    if constexpr (S == 32) {
      return __reduce_max_sync(kFullMask, v);
    } else {
      for (int off = S / 2; off; off >>= 1) v = ::max(v, __shfl_xor_sync(kFullMask, v, off));
      return v;
    }
  }
  __device__ uint32_t min(uint32_t v) const {
    if constexpr (S == 32) {
      return __reduce_min_sync(kFullMask, v);
    } else {
      for (int off = S / 2; off; off >>= 1) v = ::min(v, __shfl_xor_sync(kFullMask, v, off));
      return v;
    }
  }
  __device__ float fmax(float v) const {
    for (int off = S / 2; off; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
    return v;
  }
  __device__ float sum(float v) const {
    for (int off = S / 2; off; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
    return v;
  }
  // A whole warp's exclusive prefix sum of v in [0, kMax] (kMax < 16) by bit planes of ballots: independent
  // instructions, where the scan takes 5 dependent shuffle rounds (the chain of one token at small T):
  // softmax E = 128 T = 64 2.88 -> 2.82 us. Wider values need more planes than the scan has rounds.
  template <int kMax>
  __device__ int exclusive_sum_by_ballots(int v, int& total) const {
    static_assert(S == 32 && kMax < 16);
    const unsigned below = (1u << lane) - 1u;
    int first = 0;
    total = 0;
#pragma unroll
    for (int b = 0; (kMax >> b) != 0; ++b) {
      const unsigned plane = __ballot_sync(kFullMask, (v >> b) & 1);
      first += __popc(plane & below) << b;
      total += __popc(plane) << b;
    }
    return first;
  }
  __device__ int exclusive_sum(int v) const {
    int inclusive = v;
    for (int off = 1; off < S; off <<= 1) {
      const int up = __shfl_up_sync(kFullMask, inclusive, off, S);
      if (sl >= off) inclusive += up;
    }
    return inclusive - v;
  }
  // The lowest lane of the segment where pred holds, or S if none.
  __device__ int first(bool pred) const {
    const unsigned mine = (__ballot_sync(kFullMask, pred) >> base()) & (S == 32 ? kFullMask : (1u << S) - 1u);
    return mine ? __ffs(mine) - 1 : S;
  }
  __device__ Cand best(Cand c) const {
    for (int off = S / 2; off; off >>= 1) {
      const Cand o{__shfl_xor_sync(kFullMask, c.key, off), __shfl_xor_sync(kFullMask, c.idx, off)};
      if (before(o, c)) c = o;
    }
    return c;
  }
};

// Rows of a kernel of kWarps warps a block, W lanes a row: each warp works on 32 / W rows at a time.
template <int W, int kWarps>
struct RowGroupOf {
  static constexpr int kPerBlock = kWarps * (32 / W);  // rows a block works on at once
  __device__ static GroupLanes<W> lanes() {
    const int lane = int(threadIdx.x & 31);
    if constexpr (W == 32) {
      return {lane, kFullMask};
    } else {
      return {lane & (W - 1), ((1u << W) - 1u) << (lane & ~(W - 1))};
    }
  }
  __device__ static int64_t first() { return int64_t(blockIdx.x) * kPerBlock + (threadIdx.x / W); }
  __device__ static int64_t stride() { return int64_t(gridDim.x) * kPerBlock; }

  // Blocks for `rows` rows, at most blocks_per_sm an SM: past that, blocks loop over rows (stride).
  static unsigned grid(int64_t rows, int sm_count, int blocks_per_sm) {
    const int64_t blocks = (rows + kPerBlock - 1) / kPerBlock;
    return unsigned(blocks < int64_t(sm_count) * blocks_per_sm ? blocks : int64_t(sm_count) * blocks_per_sm);
  }
};

// A lane's share of a row copied to registers: R 16-byte chunks, in for_row's assignment (chunk c to
// lane c % nlanes). For the backwards that walk a row twice (its sums, then d logits): reading it from
// memory both times would cost a third pass over the logits, since with many rows in flight the second
// read misses the caches. A copy is a walk of the row (row_access.h). It needs a row of whole, 16-byte
// aligned chunks, at most R * nlanes of them (register_chunks).
template <class Lanes, class In, int R>
struct RowInRegisters {
  using S = typename In::storage;
  static constexpr int V = chunk_elems<S>();
  const Lanes& L;
  int64_t chunks;
  S v[R][V];

  __device__ RowInRegisters(const Lanes& lanes, const S* x, int64_t n) : L(lanes), chunks(n / V) {
#pragma unroll
    for (int i = 0; i < R; ++i)  // all loads first: R in flight per lane
      if (chunk(i) < chunks) load_chunk(x + chunk(i) * V, true, v[i]);
  }
  __device__ int64_t chunk(int i) const { return L.lane + int64_t(i) * L.nlanes; }

  // Calls f(e0, xv) for this lane's chunks, in for_row's order.
  template <class F>
  __device__ void operator()(F f) const {
#pragma unroll
    for (int i = 0; i < R; ++i) {
      if (chunk(i) >= chunks) return;
      float xv[V];
#pragma unroll
      for (int j = 0; j < V; ++j) xv[j] = In::to_float(v[i][j]);
      f(chunk(i) * V, xv);
    }
  }
};
#endif

// Chunks a lane of a RowInRegisters over W lanes for a row of `chunks` 16-byte chunks: the smallest
// power of two R <= 8 with R * W >= chunks, or 0 where the row does not fit.
inline int register_chunks(int64_t chunks, int W) {
  int R = 1;
  while (R < 8 && int64_t(R) * W < chunks) R *= 2;
  return int64_t(R) * W >= chunks ? R : 0;
}

}  // namespace jax_moe
