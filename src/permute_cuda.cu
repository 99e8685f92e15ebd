// CUDA handlers of permute / unpermute (SPEC §3). Buffers and hidden outputs: permute_ffi.h; sort
// order and pos encoding: permute_row.h.
//
// permute = a stable counting sort of the n = T·k (token, slot) pairs over E + 1 buckets (bucket E:
// indices outside [0, E)), in four small kernels, then one bandwidth-bound copy:
//   1. count:   one warp per chunk of `chunk` pairs (64 by default) counts the chunk's pairs per
//               bucket into its own column of the workspace, 32 pairs a step (__match_any_sync
//               groups equal keys; the lowest lane of each group adds the group's size, so no two
//               lanes write one counter and no atomics are needed);
//   2. scan:    one warp per bucket turns the bucket's counts into exclusive prefixes over the
//               chunks and leaves the bucket total;
//   3. starts:  one block per batch scans the bucket totals into bucket starts, writes group_sizes;
//   4. rank:    the warps walk their chunks again in the same order: row = start[key] + pairs of
//               the key in earlier chunks + in earlier steps + lower lanes of this step. Writes
//               sort_map and pos;
//   5. copy:    one block per token reads x[t] once with 16-byte loads and writes it to the rows
//               of its k pairs (zeros for invalid pairs) with streaming 16-byte stores. Every row is
//               written once, so the traffic is the copy floor: read T·H, write T·k·H.
// The sort kernels are latency-bound and short (a few round trips each); the copy dominates.
// permute backward: one block per token gathers its k rows of d x_sorted (float32 sum in slot order).
// unpermute: pos = inverse of sort_map (fill -1, then atomicMax of each row: deterministic, and
// well defined even when sort_map is not a permutation), then one block per token gathers its k
// rows (float32 weighted sum in slot order). unpermute backward: one block per token writes
// w·dy[t] to its k rows and reduces the k dot products <dy[t], y_sorted[row]> in a fixed order;
// rows that hold no pair (only if sort_map is not a permutation) are zeroed by a separate kernel.
// No float atomics, no host synchronisation, no allocation: CUDA-graph capturable.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "cuda_launch.h"
#include "ffi_helpers.h"
#include "handlers.h"
#include "permute_ffi.h"

namespace jax_moe {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kSortWarpsPerBlock = 8;
constexpr int kScanThreads = 1024;
constexpr int kScanPerLane = 8;
constexpr int kRowThreads = 128;
constexpr int kFillThreads = 256;

// ---------------------------------------------------------------- row packets
// N consecutive elements moved as one unit: 16 bytes (uint4) on the vector path, else one element.
template <class S, int N>
struct Packet {
  S v[N];
};

template <class S, int N>
__device__ __forceinline__ Packet<S, N> load_packet(const S* p) {
  Packet<S, N> r;
  if constexpr (sizeof(S) * N == 16) {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&r, &u, 16);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) r.v[i] = p[i];
  }
  return r;
}

// Streaming store (evict-first): written rows are not read again by this kernel.
template <class S, int N>
__device__ __forceinline__ void store_packet(S* p, const Packet<S, N>& r) {
  if constexpr (sizeof(S) * N == 16) {
    uint4 u;
    memcpy(&u, &r, 16);
    __stcs(reinterpret_cast<uint4*>(p), u);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = r.v[i];
  }
}

template <class S, int N>
__device__ __forceinline__ Packet<S, N> zero_packet() {
  Packet<S, N> r;
  memset(&r, 0, sizeof r);  // +0.0 in every float format
  return r;
}

// ------------------------------------------------------------- counting sort
__device__ __forceinline__ int32_t warp_inclusive_scan(int32_t v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t u = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += u;
  }
  return v;
}

// End of chunk c: min((c + 1) * chunk, pairs).
__device__ __forceinline__ int64_t chunk_end(int64_t c, int64_t chunk, int64_t pairs) {
  const int64_t end = (c + 1) * chunk;
  return end < pairs ? end : pairs;
}

struct SortArgs {
  const int32_t* indices;  // [B, n]
  int64_t batches, pairs, experts, chunk;
  PermuteWorkspace ws;
  int32_t* workspace;
};

// Kernel 1: counts[b][key][c] = pairs of chunk c with that key. Warp-private column: the lanes
// zero it, then per step the lowest lane of each group of equal keys adds the group's size.
__global__ void __launch_bounds__(kSortWarpsPerBlock * 32) permute_count_kernel(SortArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t stride = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t chunks = a.ws.chunks;
  for (int64_t w = first; w < a.batches * chunks; w += stride) {
    const int64_t b = w / chunks, c = w % chunks;
    int32_t* counts = a.workspace + a.ws.counts_offset(b) + c;  // counts[key * chunks]
    for (int64_t e = lane; e <= a.experts; e += 32) counts[e * chunks] = 0;
    __syncwarp();
    const int32_t* idx = a.indices + b * a.pairs;
    const int64_t end = chunk_end(c, a.chunk, a.pairs);
    for (int64_t p0 = c * a.chunk; p0 < end; p0 += 32) {
      const int64_t p = p0 + lane;
      const int32_t key = p < end ? pair_key(idx[p], a.experts) : -1;
      const unsigned peers = __match_any_sync(kFull, key);
      if (key >= 0 && lane == __ffs(peers) - 1) counts[int64_t(key) * chunks] += __popc(peers);
      __syncwarp();  // orders this step's updates before the next step's (another lane may lead)
    }
  }
}

// Block-wide exclusive scan of one value per thread (kScanThreads threads); `total` gets the sum.
// Every thread of the block must call it.
__device__ int32_t block_exclusive_scan(int32_t v, int32_t& total) {
  __shared__ int32_t warp_sums[kScanThreads / 32];
  __shared__ int32_t block_total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int32_t incl = warp_inclusive_scan(v, lane);
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int32_t w = warp_sums[lane];
    const int32_t w_incl = warp_inclusive_scan(w, lane);
    warp_sums[lane] = w_incl - w;  // exclusive prefix of the warp sums
    if (lane == 31) block_total = w_incl;
  }
  __syncthreads();
  const int32_t result = warp_sums[warp] + incl - v;
  total = block_total;
  __syncthreads();  // the next call overwrites warp_sums and block_total
  return result;
}

// Kernel 2: one warp per (batch, bucket) turns the bucket's counts into exclusive prefixes over
// the chunks, 32 x kScanPerLane chunks per round trip (each lane scans a run of consecutive
// chunks in registers, then the warp scans the lanes' totals), and leaves the bucket total in
// starts[bucket] for kernel 3.
__global__ void __launch_bounds__(kSortWarpsPerBlock * 32) permute_scan_chunks_kernel(SortArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t stride = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t chunks = a.ws.chunks, buckets = a.ws.buckets;
  for (int64_t w = first; w < a.batches * buckets; w += stride) {
    const int64_t b = w / buckets, e = w % buckets;
    int32_t* col = a.workspace + a.ws.counts_offset(b) + e * chunks;
    int32_t carry = 0;
    for (int64_t c0 = 0; c0 < chunks; c0 += 32 * kScanPerLane) {
      const int64_t run = c0 + lane * kScanPerLane;
      int32_t v[kScanPerLane];
#pragma unroll
      for (int i = 0; i < kScanPerLane; ++i) v[i] = run + i < chunks ? col[run + i] : 0;
      int32_t lane_total = 0;
#pragma unroll
      for (int i = 0; i < kScanPerLane; ++i) {
        const int32_t count = v[i];
        v[i] = lane_total;  // exclusive prefix within the lane's run
        lane_total += count;
      }
      const int32_t incl = warp_inclusive_scan(lane_total, lane);
      const int32_t lane_start = carry + incl - lane_total;
#pragma unroll
      for (int i = 0; i < kScanPerLane; ++i)
        if (run + i < chunks) col[run + i] = lane_start + v[i];
      carry += __shfl_sync(kFull, incl, 31);
    }
    if (lane == 0) a.workspace[a.ws.starts_offset(a.batches, b) + e] = carry;
  }
}

// Kernel 3, one block per batch: bucket totals -> starts (exclusive prefix over the buckets) and
// group_sizes.
__global__ void __launch_bounds__(kScanThreads) permute_scan_buckets_kernel(SortArgs a, int32_t* group_sizes) {
  const int64_t buckets = a.ws.buckets;
  for (int64_t b = blockIdx.x; b < a.batches; b += gridDim.x) {
    int32_t* starts = a.workspace + a.ws.starts_offset(a.batches, b);
    int32_t running = 0;
    for (int64_t e0 = 0; e0 < buckets; e0 += kScanThreads) {
      const int64_t e = e0 + threadIdx.x;
      const int32_t total = e < buckets ? starts[e] : 0;
      int32_t tile_total;
      const int32_t excl = block_exclusive_scan(total, tile_total);
      if (e < buckets) {
        starts[e] = running + excl;
        if (e < a.experts) group_sizes[b * a.experts + e] = total;
      }
      running += tile_total;
    }
  }
}

// Kernel 4: the same walk as kernel 1; each pair's row is its bucket start plus the pairs of its
// bucket before it (earlier chunks, earlier steps, lower lanes).
__global__ void __launch_bounds__(kSortWarpsPerBlock * 32)
    permute_rank_kernel(SortArgs a, int32_t* __restrict__ sort_map, int32_t* __restrict__ pos) {
  const int lane = threadIdx.x & 31;
  const int64_t first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t stride = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t chunks = a.ws.chunks;
  const unsigned below = (1u << lane) - 1u;
  for (int64_t w = first; w < a.batches * chunks; w += stride) {
    const int64_t b = w / chunks, c = w % chunks;
    int32_t* counts = a.workspace + a.ws.counts_offset(b) + c;
    const int32_t* starts = a.workspace + a.ws.starts_offset(a.batches, b);
    const int32_t* idx = a.indices + b * a.pairs;
    int32_t* sm = sort_map + b * a.pairs;
    int32_t* ps = pos + b * a.pairs;
    const int64_t end = chunk_end(c, a.chunk, a.pairs);
    for (int64_t p0 = c * a.chunk; p0 < end; p0 += 32) {
      const int64_t p = p0 + lane;
      const int32_t key = p < end ? pair_key(idx[p], a.experts) : -1;
      const unsigned peers = __match_any_sync(kFull, key);
      const int leader = __ffs(peers) - 1;
      const bool leads = key >= 0 && lane == leader;
      const int32_t before = leads ? counts[int64_t(key) * chunks] : 0;
      const int32_t base = __shfl_sync(kFull, before, leader);
      if (key >= 0) {
        const int64_t row = int64_t(starts[key]) + base + __popc(peers & below);
        if (row < a.pairs) {  // always true; a guard against out-of-bounds writes regardless
          sm[row] = int32_t(p);
          ps[p] = encode_pos(int32_t(row), key < a.experts);
        }
        if (leads) counts[int64_t(key) * chunks] = base + __popc(peers);
      }
      __syncwarp();
    }
  }
}

// ------------------------------------------------------------------ row kernels
struct RowArgs {
  int64_t batches, tokens, topk, hidden, pairs;
};

// Kernel 5: x_sorted[row(t, j)] = x[t] for valid pairs, zeros for the others.
template <class S, int N>
__global__ void __launch_bounds__(kRowThreads)
    permute_copy_kernel(RowArgs a, const S* __restrict__ x, const int32_t* __restrict__ pos, S* __restrict__ xs) {
  const int64_t packets = a.hidden / N;
  for (int64_t bt = blockIdx.x; bt < a.batches * a.tokens; bt += gridDim.x) {
    const int64_t b = bt / a.tokens, t = bt % a.tokens;
    const S* src = x + bt * a.hidden;
    const int32_t* ps = pos + b * a.pairs + t * a.topk;
    S* dst = xs + b * a.pairs * a.hidden;
#pragma unroll 2
    for (int64_t v = threadIdx.x; v < packets; v += blockDim.x) {
      const Packet<S, N> val = load_packet<S, N>(src + v * N);
      for (int64_t j = 0; j < a.topk; ++j) {
        const int32_t pp = __ldg(ps + j);
        const int64_t row = pos_row(pp);
        if (row < a.pairs) store_packet<S, N>(dst + row * a.hidden + v * N, pos_valid(pp) ? val : zero_packet<S, N>());
      }
    }
  }
}

// out[t] = Σ_j w(t, j) · rows[pos(t, j)] over the slots with a row (pos >= 0), in slot order.
// Permute backward (no weights; invalid pairs are encoded negative) and unpermute forward. The rows
// of kSlots slots are loaded together, so that each thread has several loads in flight.
template <class In, int N>
__global__ void __launch_bounds__(kRowThreads)
    combine_rows_kernel(RowArgs a, const typename In::storage* __restrict__ rows, const int32_t* __restrict__ pos,
                        const void* __restrict__ weights, Dtype w_dtype, typename In::storage* __restrict__ out) {
  using S = typename In::storage;
  constexpr int kSlots = 4;
  const int64_t packets = a.hidden / N;
  for (int64_t bt = blockIdx.x; bt < a.batches * a.tokens; bt += gridDim.x) {
    const int64_t b = bt / a.tokens, t = bt % a.tokens;
    const int32_t* ps = pos + b * a.pairs + t * a.topk;
    const S* src = rows + b * a.pairs * a.hidden;
    for (int64_t v = threadIdx.x; v < packets; v += blockDim.x) {
      float acc[N];
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = 0.0f;
      for (int64_t j0 = 0; j0 < a.topk; j0 += kSlots) {
        Packet<S, N> in[kSlots];
        float w[kSlots];
        bool has_row[kSlots];
#pragma unroll
        for (int u = 0; u < kSlots; ++u) {
          const int64_t j = j0 + u;
          const int32_t r = j < a.topk ? __ldg(ps + j) : -1;
          has_row[u] = r >= 0 && r < a.pairs;
          w[u] = has_row[u] && weights ? load_float(weights, bt * a.topk + j, w_dtype) : 1.0f;
          in[u] = has_row[u] ? load_packet<S, N>(src + int64_t(r) * a.hidden + v * N) : zero_packet<S, N>();
        }
#pragma unroll
        for (int u = 0; u < kSlots; ++u)
          if (has_row[u])
#pragma unroll
            for (int i = 0; i < N; ++i) acc[i] = fmaf(w[u], In::to_float(in[u].v[i]), acc[i]);
      }
      Packet<S, N> res;
#pragma unroll
      for (int i = 0; i < N; ++i) res.v[i] = In::from_float(acc[i]);
      store_packet<S, N>(out + bt * a.hidden + v * N, res);
    }
  }
}

// Per-slot sums over the block of K floats per thread, in a fixed order: thread u < K gets slot u's sum.
template <int K>
__device__ float block_slot_sums(float (&v)[K]) {
  __shared__ float partial[kRowThreads / 32][K];
#pragma unroll
  for (int u = 0; u < K; ++u) {
    for (int off = 16; off; off >>= 1) v[u] += __shfl_xor_sync(kFull, v[u], off);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5][u] = v[u];
  }
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x < K)
    for (int w = 0; w < kRowThreads / 32; ++w) total += partial[w][threadIdx.x];
  __syncthreads();  // partial is reused by the next call
  return total;
}

// Unpermute backward: d y_sorted[pos(t, j)] = w(t, j) · dy[t], d w(t, j) = <dy[t], y_sorted[pos(t, j)]>.
// The slots are taken kSlots at a time: a thread loads its packet of every slot's row together (several
// loads in flight, dy read once for them), and one block reduction gives all their dot products.
template <class In, int N>
__global__ void __launch_bounds__(kRowThreads)
    unpermute_bwd_kernel(RowArgs a, const typename In::storage* __restrict__ dy,
                         const typename In::storage* __restrict__ ys, const int32_t* __restrict__ pos,
                         const void* __restrict__ weights, Dtype w_dtype, typename In::storage* __restrict__ dys,
                         void* __restrict__ dweights) {
  using S = typename In::storage;
  constexpr int kSlots = 8;
  const int64_t packets = a.hidden / N;
  for (int64_t bt = blockIdx.x; bt < a.batches * a.tokens; bt += gridDim.x) {
    const int64_t b = bt / a.tokens, t = bt % a.tokens;
    const S* g = dy + bt * a.hidden;
    for (int64_t j0 = 0; j0 < a.topk; j0 += kSlots) {
      int64_t row[kSlots];  // element offset of the slot's row, -1 without one
      float w[kSlots], dot[kSlots];
#pragma unroll
      for (int u = 0; u < kSlots; ++u) {
        const int64_t j = j0 + u;
        const int32_t r = j < a.topk ? __ldg(pos + b * a.pairs + t * a.topk + j) : -1;
        const bool has_row = r >= 0 && r < a.pairs;
        row[u] = has_row ? (b * a.pairs + r) * a.hidden : -1;
        w[u] = has_row ? load_float(weights, bt * a.topk + j, w_dtype) : 0.0f;
        dot[u] = 0.0f;
      }
      for (int64_t v = threadIdx.x; v < packets; v += blockDim.x) {
        const Packet<S, N> gp = load_packet<S, N>(g + v * N);
        Packet<S, N> yp[kSlots];
#pragma unroll
        for (int u = 0; u < kSlots; ++u)
          if (row[u] >= 0) yp[u] = load_packet<S, N>(ys + row[u] + v * N);
        float gf[N];
#pragma unroll
        for (int i = 0; i < N; ++i) gf[i] = In::to_float(gp.v[i]);
#pragma unroll
        for (int u = 0; u < kSlots; ++u) {
          if (row[u] < 0) continue;
          Packet<S, N> res;
#pragma unroll
          for (int i = 0; i < N; ++i) {
            dot[u] = fmaf(gf[i], In::to_float(yp[u].v[i]), dot[u]);
            res.v[i] = In::from_float(w[u] * gf[i]);
          }
          store_packet<S, N>(dys + row[u] + v * N, res);
        }
      }
      const float sum = block_slot_sums<kSlots>(dot);
      if (threadIdx.x < kSlots && j0 + threadIdx.x < a.topk)
        store_float(dweights, bt * a.topk + j0 + threadIdx.x, sum, w_dtype);
    }
  }
}

// Rows of d y_sorted that hold no pair (pos[sort_map[r]] != r) get zeros: a no-op for a permutation.
template <class S>
__global__ void __launch_bounds__(kFillThreads)
    zero_orphan_rows_kernel(RowArgs a, const int32_t* __restrict__ sort_map, const int32_t* __restrict__ pos,
                            S* __restrict__ dys) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.batches * a.pairs; i += stride) {
    const int64_t b = i / a.pairs, r = i % a.pairs;
    const int32_t p = sort_map[i];
    if (p >= 0 && p < a.pairs && pos[b * a.pairs + p] == r) continue;
    S* row = dys + i * a.hidden;
    for (int64_t h = 0; h < a.hidden; ++h) row[h] = S(0);
  }
}

__global__ void __launch_bounds__(kFillThreads) fill_kernel(int32_t* __restrict__ p, int64_t count, int32_t value) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) p[i] = value;
}

// pos[b][sort_map[b][r]] = max r (pos filled with -1 before).
__global__ void __launch_bounds__(kFillThreads)
    invert_sort_map_kernel(RowArgs a, const int32_t* __restrict__ sort_map, int32_t* __restrict__ pos) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.batches * a.pairs; i += stride) {
    const int64_t b = i / a.pairs, r = i % a.pairs;
    const int32_t p = sort_map[i];
    if (p >= 0 && p < a.pairs) atomicMax(pos + b * a.pairs + p, int32_t(r));
  }
}

// ------------------------------------------------------------------- launch
// Blocks for `items` work items of `per_block` each, capped so that blocks loop over the rest.
unsigned grid_for(int64_t items, int64_t per_block, const DeviceLimits& dev, int64_t blocks_per_sm) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(dev.sm_count) * blocks_per_sm)));
}

RowArgs row_args(const PermuteShapes& s) { return {s.batches, s.tokens, s.topk, s.hidden, s.pairs}; }

// True when rows of `hidden` elements of `bytes` each can move as 16-byte packets: every row start
// and every base pointer 16-byte aligned.
bool packets_fit(int64_t hidden, int bytes, std::initializer_list<const void*> ptrs) {
  if ((hidden * bytes) % 16) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16) return false;
  return true;
}

// Calls f.template operator()<N>() with N = elements per packet (16 bytes, or 1 when unaligned).
template <class S, class F>
ffi::Error dispatch_packet(bool vector, F&& f) {
  if (vector) return f.template operator()<int(16 / sizeof(S))>();
  return f.template operator()<1>();
}

ffi::Error permute_fwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer indices,
                       ffi::Result<ffi::AnyBuffer> x_sorted, ffi::Result<ffi::AnyBuffer> group_sizes,
                       ffi::Result<ffi::AnyBuffer> sort_map, ffi::Result<ffi::AnyBuffer> pos,
                       ffi::Result<ffi::AnyBuffer> workspace, int64_t num_experts, int64_t chunk) {
  auto shapes = check_permute_fwd(x, indices, *x_sorted, *group_sizes, *sort_map, *pos, *workspace, num_experts, chunk);
  if (shapes.has_error()) return shapes.error();
  const PermuteShapes s = *shapes;
  if (s.batches == 0) return ffi::Error::Success();
  const DeviceLimits dev = device_limits(device);
  const SortArgs sort{indices.typed_data<int32_t>(), s.batches, s.pairs, s.experts, s.chunk,
                      permute_workspace(s.pairs, s.experts, s.chunk), workspace->typed_data<int32_t>()};
  int32_t* gs = group_sizes->typed_data<int32_t>();
  if (s.pairs == 0) {  // no pairs: every group is empty
    fill_kernel<<<grid_for(s.batches * s.experts, kFillThreads, dev, 4), kFillThreads, 0, stream>>>(
        gs, s.batches * s.experts, 0);
    return launch_status("permute (empty)");
  }
  const int64_t warps = s.batches * sort.ws.chunks;
  const unsigned sort_grid = grid_for(warps, kSortWarpsPerBlock, dev, 8);
  permute_count_kernel<<<sort_grid, kSortWarpsPerBlock * 32, 0, stream>>>(sort);
  permute_scan_chunks_kernel<<<grid_for(s.batches * sort.ws.buckets, kSortWarpsPerBlock, dev, 8),
                               kSortWarpsPerBlock * 32, 0, stream>>>(sort);
  permute_scan_buckets_kernel<<<unsigned(std::min<int64_t>(s.batches, 65535)), kScanThreads, 0, stream>>>(sort, gs);
  permute_rank_kernel<<<sort_grid, kSortWarpsPerBlock * 32, 0, stream>>>(sort, sort_map->typed_data<int32_t>(),
                                                                        pos->typed_data<int32_t>());
  if (auto err = launch_status("permute (sort)"); err.failure()) return err;
  if (s.hidden == 0) return ffi::Error::Success();

  const int bytes = s.dtype == Dtype::kF32 ? 4 : 2;
  const bool vector = packets_fit(s.hidden, bytes, {x.untyped_data(), x_sorted->untyped_data()});
  const unsigned grid = grid_for(s.batches * s.tokens, 1, dev, 32);
  auto copy = [&]<class S>() {
    return dispatch_packet<S>(vector, [&]<int N>() {
      permute_copy_kernel<S, N><<<grid, kRowThreads, 0, stream>>>(row_args(s), static_cast<const S*>(x.untyped_data()),
                                                                 pos->typed_data<int32_t>(),
                                                                 static_cast<S*>(x_sorted->untyped_data()));
      return launch_status("permute (copy)");
    });
  };
  // The copy moves raw bits: only the element size matters.
  return bytes == 4 ? copy.template operator()<float>() : copy.template operator()<uint16_t>();
}

ffi::Error permute_bwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer dx_sorted, ffi::AnyBuffer pos,
                       ffi::Result<ffi::AnyBuffer> dx, int64_t topk) {
  auto shapes = check_permute_bwd(dx_sorted, pos, *dx, topk);
  if (shapes.has_error()) return shapes.error();
  const PermuteShapes s = *shapes;
  if (s.batches * s.tokens == 0 || s.hidden == 0) return ffi::Error::Success();
  const DeviceLimits dev = device_limits(device);
  const int bytes = s.dtype == Dtype::kF32 ? 4 : 2;
  const bool vector = packets_fit(s.hidden, bytes, {dx_sorted.untyped_data(), dx->untyped_data()});
  const unsigned grid = grid_for(s.batches * s.tokens, 1, dev, 32);
  return dispatch_float(s.dtype, [&]<class In>() {
    using S = typename In::storage;
    return dispatch_packet<S>(vector, [&]<int N>() {
      combine_rows_kernel<In, N><<<grid, kRowThreads, 0, stream>>>(
          row_args(s), static_cast<const S*>(dx_sorted.untyped_data()), pos.typed_data<int32_t>(), nullptr,
          Dtype::kF32, static_cast<S*>(dx->untyped_data()));
      return launch_status("permute backward");
    });
  });
}

// pos = the inverse of sort_map (-1 where no row holds the pair).
ffi::Error invert_sort_map(cudaStream_t stream, const DeviceLimits& dev, const PermuteShapes& s,
                           const int32_t* sort_map, int32_t* pos) {
  const int64_t count = s.batches * s.pairs;
  const unsigned grid = grid_for(count, kFillThreads, dev, 4);
  fill_kernel<<<grid, kFillThreads, 0, stream>>>(pos, count, -1);
  invert_sort_map_kernel<<<grid, kFillThreads, 0, stream>>>(row_args(s), sort_map, pos);
  return launch_status("unpermute (inverse of sort_map)");
}

ffi::Error unpermute_fwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer y_sorted, ffi::AnyBuffer sort_map,
                         ffi::AnyBuffer weights, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> pos) {
  auto shapes = check_unpermute_fwd(y_sorted, sort_map, weights, *y, *pos);
  if (shapes.has_error()) return shapes.error();
  const PermuteShapes s = *shapes;
  if (s.batches * s.pairs == 0) return ffi::Error::Success();
  const DeviceLimits dev = device_limits(device);
  int32_t* ps = pos->typed_data<int32_t>();
  if (auto err = invert_sort_map(stream, dev, s, sort_map.typed_data<int32_t>(), ps); err.failure()) return err;
  if (s.hidden == 0) return ffi::Error::Success();
  const int bytes = s.dtype == Dtype::kF32 ? 4 : 2;
  const bool vector = packets_fit(s.hidden, bytes, {y_sorted.untyped_data(), y->untyped_data()});
  const unsigned grid = grid_for(s.batches * s.tokens, 1, dev, 32);
  return dispatch_float(s.dtype, [&]<class In>() {
    using S = typename In::storage;
    return dispatch_packet<S>(vector, [&]<int N>() {
      combine_rows_kernel<In, N><<<grid, kRowThreads, 0, stream>>>(
          row_args(s), static_cast<const S*>(y_sorted.untyped_data()), ps, weights.untyped_data(), s.w_dtype,
          static_cast<S*>(y->untyped_data()));
      return launch_status("unpermute");
    });
  });
}

ffi::Error unpermute_bwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer dy, ffi::AnyBuffer y_sorted,
                         ffi::AnyBuffer sort_map, ffi::AnyBuffer pos, ffi::AnyBuffer weights,
                         ffi::Result<ffi::AnyBuffer> dy_sorted, ffi::Result<ffi::AnyBuffer> dweights) {
  auto shapes = check_unpermute_bwd(dy, y_sorted, sort_map, pos, weights, *dy_sorted, *dweights);
  if (shapes.has_error()) return shapes.error();
  const PermuteShapes s = *shapes;
  if (s.batches * s.pairs == 0) return ffi::Error::Success();
  const DeviceLimits dev = device_limits(device);
  const int bytes = s.dtype == Dtype::kF32 ? 4 : 2;
  const bool vector =
      packets_fit(s.hidden, bytes, {dy.untyped_data(), y_sorted.untyped_data(), dy_sorted->untyped_data()});
  const unsigned grid = grid_for(s.batches * s.tokens, 1, dev, 32);
  return dispatch_float(s.dtype, [&]<class In>() {
    using S = typename In::storage;
    auto* dys = static_cast<S*>(dy_sorted->untyped_data());
    if (s.hidden > 0)
      zero_orphan_rows_kernel<S><<<grid_for(s.batches * s.pairs, kFillThreads, dev, 4), kFillThreads, 0, stream>>>(
          row_args(s), sort_map.typed_data<int32_t>(), pos.typed_data<int32_t>(), dys);
    return dispatch_packet<S>(vector, [&]<int N>() {
      // Runs even when H = 0: d weights are then zeros.
      unpermute_bwd_kernel<In, N><<<grid, kRowThreads, 0, stream>>>(
          row_args(s), static_cast<const S*>(dy.untyped_data()), static_cast<const S*>(y_sorted.untyped_data()),
          pos.typed_data<int32_t>(), weights.untyped_data(), s.w_dtype, dys, dweights->untyped_data());
      return launch_status("unpermute backward");
    });
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_permute_fwd_cuda, permute_fwd,
                              bind_stream_and_device()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("chunk"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_permute_bwd_cuda, permute_bwd,
                              bind_stream_and_device()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("topk"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_unpermute_fwd_cuda, unpermute_fwd,
                              bind_stream_and_device()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_unpermute_bwd_cuda, unpermute_bwd,
                              bind_stream_and_device()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_moe
