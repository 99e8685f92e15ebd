// Device-side group bookkeeping shared by the grouped GEMM implementations: one small kernel turns
// the device-resident group sizes into clamped row offsets (and, per implementation, problem
// descriptors), so that no host synchronisation is needed.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "grouped_gemm_internal.h"

namespace jax_moe::detail {

constexpr int kPrepThreads = 256;

// Inclusive scan of one int64 per thread over a block of kPrepThreads threads; `total` receives the
// block-wide sum. Every thread of the block must call it.
__device__ inline int64_t block_inclusive_scan(int64_t v, int64_t& total) {
  constexpr int kWarps = kPrepThreads / 32;
  __shared__ int64_t warp_sums[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  if (lane == 31) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int64_t w = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < kWarps; o <<= 1) {
      const int64_t n = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += n;
    }
    if (lane < kWarps) warp_sums[lane] = w;
  }
  __syncthreads();
  if (warp > 0) v += warp_sums[warp - 1];
  total = warp_sums[kWarps - 1];
  // The next call overwrites warp_sums: every thread must have read it first.
  __syncthreads();
  return v;
}

// Launched as <<<1, kPrepThreads>>>. Walks the groups in chunks of kPrepThreads and, for each group
// g, computes the clamped start row and size (negative sizes count as 0; a running sum above M is
// cut at M), fills the GroupTables (offsets; the ascending list of empty groups when
// tables.empty_groups is set) and calls
//   visitor(g, start_row, rows, first_tile)
// where first_tile = sum over earlier groups of ceil(rows / tile_m), and finally
//   visitor.finish(total_tiles)
// from thread 0.
template <class Visitor>
__global__ void __launch_bounds__(kPrepThreads)
    group_prep_kernel(const int32_t* __restrict__ group_sizes, int64_t G, int64_t M, int64_t tile_m,
                      GroupTables tables, Visitor visitor) {
  int64_t row_carry = 0;
  int64_t tile_carry = 0;
  int64_t empty_carry = 0;
  for (int64_t base = 0; base < G; base += kPrepThreads) {
    const int64_t g = base + threadIdx.x;
    const int64_t raw = g < G ? static_cast<int64_t>(max(group_sizes[g], 0)) : 0;
    int64_t raw_total;
    const int64_t raw_incl = block_inclusive_scan(raw, raw_total);
    const int64_t start = min(row_carry + raw_incl - raw, M);
    const int64_t rows = min(row_carry + raw_incl, M) - start;
    const int64_t tiles = (rows + tile_m - 1) / tile_m;
    int64_t tile_total;
    const int64_t tile_incl = block_inclusive_scan(tiles, tile_total);
    if (tables.empty_groups != nullptr) {
      const int64_t is_empty = (g < G && rows == 0) ? 1 : 0;
      int64_t empty_total;
      const int64_t empty_incl = block_inclusive_scan(is_empty, empty_total);
      if (is_empty) tables.empty_groups[1 + empty_carry + empty_incl - 1] = static_cast<int32_t>(g);
      empty_carry += empty_total;
    }
    if (g < G) {
      tables.offsets[g] = start;
      visitor(g, start, rows, tile_carry + tile_incl - tiles);
    }
    row_carry += raw_total;
    tile_carry += tile_total;
  }
  if (threadIdx.x == 0) {
    tables.offsets[G] = min(row_carry, M);
    if (tables.empty_groups != nullptr) tables.empty_groups[0] = static_cast<int32_t>(empty_carry);
    visitor.finish(tile_carry);
  }
}

}  // namespace jax_moe::detail
