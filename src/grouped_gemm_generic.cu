// Generic grouped GEMM: a tiled shared-memory SIMT kernel for any architecture and every dtype
// (f32 always; bf16/f16 where the sm_90a CUTLASS path does not apply). f32 accumulation.
//
// kForward / kGradLhs: the prep kernel numbers the row tiles of every group (each group padded to
// whole tiles of kBM rows), so a block owns rows of exactly one group and multiplies them by that
// group's rhs only. kGradRhs: one block per (group, K tile, N tile), looping over the group's rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "grouped_gemm_internal.h"
#include "grouped_gemm_prep.cuh"

namespace jax_moe::detail {
namespace {

constexpr int kBM = 64;   // output tile rows
constexpr int kBN = 64;   // output tile columns
constexpr int kBK = 16;   // contraction step
constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;
// Each thread computes a 4x4 sub-tile, rows ty + 16 i and columns tx + 16 j: a warp then reads
// two distinct A words and 16 consecutive B words per step (no bank conflicts).
constexpr int kTM = kBM / 16;
constexpr int kTN = kBN / 16;

__device__ inline float to_f32(float v) { return v; }
__device__ inline float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float to_f32(__half v) { return __half2float(v); }

template <typename T>
__device__ inline T from_f32(float v);
template <>
__device__ inline float from_f32<float>(float v) { return v; }
template <>
__device__ inline __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ inline __half from_f32<__half>(float v) { return __float2half_rn(v); }

struct TileOffsetsVisitor {
  int64_t* tile_offsets;  // [G+1]
  int64_t G;
  __device__ void operator()(int64_t g, int64_t, int64_t, int64_t first_tile) const {
    tile_offsets[g] = first_tile;
  }
  __device__ void finish(int64_t total_tiles) const { tile_offsets[G] = total_tiles; }
};

struct NoVisitor {
  __device__ void operator()(int64_t, int64_t, int64_t, int64_t) const {}
  __device__ void finish(int64_t) const {}
};

template <typename T>
struct Params {
  const T* a;
  const T* b;
  T* out;
  const int64_t* offsets;       // [G+1], from the prep kernel
  const int64_t* tile_offsets;  // [G+1], first padded row tile of each group
  int64_t M, K, N, G;
};

// Shared tiles hold f32 (converted on load); +4 padding breaks the bank conflicts of the
// transposed stores.
struct SmemTiles {
  float a[kBK][kBM + 4];
  float b[kBK][kBN + 4];
};

__device__ inline void accumulate_tile(const SmemTiles& s, float (&acc)[kTM][kTN]) {
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
#pragma unroll
  for (int k = 0; k < kBK; ++k) {
    float av[kTM], bv[kTN];
#pragma unroll
    for (int i = 0; i < kTM; ++i) av[i] = s.a[k][ty + 16 * i];
#pragma unroll
    for (int j = 0; j < kTN; ++j) bv[j] = s.b[k][tx + 16 * j];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
  }
}

// kForward / kGradLhs. grid.x runs over an upper bound of the padded row tiles, grid.y over
// column tiles (strided when there are more than kMaxGridY).
template <typename T, GemmOp OP>
__global__ void __launch_bounds__(kThreads) ragged_rows_kernel(Params<T> p) {
  static_assert(OP == GemmOp::kForward || OP == GemmOp::kGradLhs, "row-ragged ops only");
  const int64_t t = blockIdx.x;
  if (t >= p.tile_offsets[p.G]) return;
  // The group of tile t is the last g with tile_offsets[g] <= t (empty groups before it share
  // its tile offset, those after it start past t).
  int64_t lo = 0, hi = p.G - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (p.tile_offsets[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const int64_t g = lo;
  const int64_t row0 = p.offsets[g] + (t - p.tile_offsets[g]) * kBM;
  const int64_t row_end = p.offsets[g + 1];
  // Contraction length and output width: forward contracts K and writes N; d lhs the reverse.
  const int64_t Kc = OP == GemmOp::kForward ? p.K : p.N;
  const int64_t W = OP == GemmOp::kForward ? p.N : p.K;
  const T* b_g = p.b + g * p.K * p.N;
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  __shared__ SmemTiles s;

  for (int64_t col0 = static_cast<int64_t>(blockIdx.y) * kBN; col0 < W;
       col0 += static_cast<int64_t>(gridDim.y) * kBN) {
    float acc[kTM][kTN] = {};
    for (int64_t kc0 = 0; kc0 < Kc; kc0 += kBK) {
#pragma unroll
      for (int i = 0; i < kBM * kBK / kThreads; ++i) {
        // A rows are contiguous along the contraction: consecutive threads read consecutive kc.
        const int idx = threadIdx.x + kThreads * i;
        const int m = idx / kBK, kk = idx % kBK;
        const int64_t row = row0 + m, kc = kc0 + kk;
        s.a[kk][m] = (row < row_end && kc < Kc) ? to_f32(p.a[row * Kc + kc]) : 0.f;
      }
#pragma unroll
      for (int i = 0; i < kBN * kBK / kThreads; ++i) {
        const int idx = threadIdx.x + kThreads * i;
        if constexpr (OP == GemmOp::kForward) {
          // rhs[g] is [K, N]: element (kc, col) at kc * N + col, contiguous along col.
          const int kk = idx / kBN, w = idx % kBN;
          const int64_t kc = kc0 + kk, col = col0 + w;
          s.b[kk][w] = (kc < Kc && col < W) ? to_f32(b_g[kc * p.N + col]) : 0.f;
        } else {
          // rhs[g]^T: element (kc = n, col = k) at k * N + n, contiguous along kc.
          const int w = idx / kBK, kk = idx % kBK;
          const int64_t kc = kc0 + kk, col = col0 + w;
          s.b[kk][w] = (kc < Kc && col < W) ? to_f32(b_g[col * p.N + kc]) : 0.f;
        }
      }
      __syncthreads();
      accumulate_tile(s, acc);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int64_t row = row0 + ty + 16 * i;
      if (row >= row_end) continue;
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        const int64_t col = col0 + tx + 16 * j;
        if (col < W) p.out[row * W + col] = from_f32<T>(acc[i][j]);
      }
    }
  }
}

// kGradRhs: out[g] [K, N] = lhs_g^T @ dout_g. grid.x = K tiles x N tiles, grid.y strides over
// groups. Empty groups are left to the dispatcher's zero kernel.
template <typename T>
__global__ void __launch_bounds__(kThreads) ragged_contraction_kernel(Params<T> p) {
  const int64_t tiles_n = (p.N + kBN - 1) / kBN;
  const int64_t m0 = (blockIdx.x / tiles_n) * kBM;  // rows of out[g]: the K dimension
  const int64_t col0 = (blockIdx.x % tiles_n) * kBN;
  const int tx = threadIdx.x % 16;
  const int ty = threadIdx.x / 16;
  __shared__ SmemTiles s;

  for (int64_t g = blockIdx.y; g < p.G; g += gridDim.y) {
    const int64_t r_begin = p.offsets[g], r_end = p.offsets[g + 1];
    if (r_begin == r_end) continue;
    float acc[kTM][kTN] = {};
    for (int64_t r0 = r_begin; r0 < r_end; r0 += kBK) {
#pragma unroll
      for (int i = 0; i < kBM * kBK / kThreads; ++i) {
        // lhs row r, columns m0.. : contiguous along the K dimension.
        const int idx = threadIdx.x + kThreads * i;
        const int kk = idx / kBM, m = idx % kBM;
        const int64_t r = r0 + kk, k = m0 + m;
        s.a[kk][m] = (r < r_end && k < p.K) ? to_f32(p.a[r * p.K + k]) : 0.f;
      }
#pragma unroll
      for (int i = 0; i < kBN * kBK / kThreads; ++i) {
        const int idx = threadIdx.x + kThreads * i;
        const int kk = idx / kBN, w = idx % kBN;
        const int64_t r = r0 + kk, n = col0 + w;
        s.b[kk][w] = (r < r_end && n < p.N) ? to_f32(p.b[r * p.N + n]) : 0.f;
      }
      __syncthreads();
      accumulate_tile(s, acc);
      __syncthreads();
    }
    T* out_g = p.out + g * p.K * p.N;
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int64_t k = m0 + ty + 16 * i;
      if (k >= p.K) continue;
#pragma unroll
      for (int j = 0; j < kTN; ++j) {
        const int64_t n = col0 + tx + 16 * j;
        if (n < p.N) out_g[k * p.N + n] = from_f32<T>(acc[i][j]);
      }
    }
  }
}

template <typename T>
cudaError_t launch(const GroupedGemmArgs& args, GroupTables tables, int64_t* tile_offsets,
                   cudaStream_t stream) {
  const Params<T> p{static_cast<const T*>(args.a), static_cast<const T*>(args.b),
                    static_cast<T*>(args.out), tables.offsets, tile_offsets,
                    args.M, args.K, args.N, args.G};
  if (args.op == GemmOp::kGradRhs) {
    const int64_t tiles = ((args.K + kBM - 1) / kBM) * ((args.N + kBN - 1) / kBN);
    if (tiles > INT_MAX) return cudaErrorInvalidValue;
    group_prep_kernel<<<1, kPrepThreads, 0, stream>>>(args.group_sizes, args.G, args.M, 1,
                                                      tables, NoVisitor{});
    const dim3 grid(static_cast<unsigned>(tiles),
                    static_cast<unsigned>(args.G < kMaxGridY ? args.G : kMaxGridY));
    ragged_contraction_kernel<T><<<grid, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  // Padding every group to whole tiles adds at most one tile per group.
  const int64_t row_tiles = (args.M + kBM - 1) / kBM + args.G;
  if (row_tiles > INT_MAX) return cudaErrorInvalidValue;
  const int64_t W = args.op == GemmOp::kForward ? args.N : args.K;
  const int64_t col_tiles = (W + kBN - 1) / kBN;
  group_prep_kernel<<<1, kPrepThreads, 0, stream>>>(args.group_sizes, args.G, args.M, kBM,
                                                    tables,
                                                    TileOffsetsVisitor{tile_offsets, args.G});
  const dim3 grid(static_cast<unsigned>(row_tiles),
                  static_cast<unsigned>(col_tiles < kMaxGridY ? col_tiles : kMaxGridY));
  if (args.op == GemmOp::kForward)
    ragged_rows_kernel<T, GemmOp::kForward><<<grid, kThreads, 0, stream>>>(p);
  else
    ragged_rows_kernel<T, GemmOp::kGradLhs><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

size_t generic_scratch_bytes(GemmOp op, int64_t G) {
  // Tile offsets, int64[G+1], for the row-ragged ops.
  return op == GemmOp::kGradRhs ? 0 : align_up(sizeof(int64_t) * (G + 1), kWorkspaceAlign);
}

cudaError_t generic_run(const GroupedGemmArgs& args, GroupTables tables, char* scratch,
                        cudaStream_t stream) {
  int64_t* tile_offsets = reinterpret_cast<int64_t*>(scratch);
  switch (args.dtype) {
    case GemmDtype::kF32: return launch<float>(args, tables, tile_offsets, stream);
    case GemmDtype::kBF16: return launch<__nv_bfloat16>(args, tables, tile_offsets, stream);
    case GemmDtype::kF16: return launch<__half>(args, tables, tile_offsets, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jax_moe::detail
