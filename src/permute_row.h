// Token permutation for the experts (SPEC §3), the part written once for every platform: the sort
// key of a (token, slot) pair, the encoding of the hidden `pos` arrays, and the layout of the
// counting-sort workspace. FFI-free, so both the CPU and the CUDA kernels include it.
//
// Notation: a batch of the primitives holds T tokens with k slots each, n = T·k pairs; pair
// p = t·k + j goes to expert indices[p]. Rows of x_sorted are ordered by (key, p) where
// key = indices[p] for indices in [0, E) and key = E (after every group) otherwise: a stable
// counting sort over E + 1 buckets.
//
// Hidden `pos` arrays (never seen by the user):
//   * permute's pos[p] = row of pair p in x_sorted, encoded as row for a valid pair and -1 - row
//     for an invalid one (its row is zero and gets no gradient). Decoded by pos_row/pos_valid.
//   * unpermute's pos[p] = the row r with sort_map[r] = p (the largest such r should sort_map not
//     be a permutation), or -1 when no row holds pair p. A negative entry is "no row" in both.
#pragma once

#include <cstdint>

#include "moe_math.h"

namespace jax_moe {

// Bucket of an expert index: itself when in [0, E), else E (the bucket after every group).
MOE_HD int32_t pair_key(int32_t expert, int64_t num_experts) {
  return (expert >= 0 && int64_t(expert) < num_experts) ? expert : int32_t(num_experts);
}

MOE_HD int32_t encode_pos(int32_t row, bool valid) { return valid ? row : -1 - row; }
MOE_HD bool pos_valid(int32_t pos) { return pos >= 0; }
MOE_HD int32_t pos_row(int32_t pos) { return pos >= 0 ? pos : -1 - pos; }

// ------------------------------------------------------------- sort workspace
// The CUDA counting sort splits each batch's n pairs into chunks of `chunk` pairs (a multiple of
// 32: one warp walks a chunk 32 pairs at a time). Its int32 workspace holds, per batch,
//   counts [E + 1][chunks]: pairs of each bucket in each chunk, then (after the scan) the
//                           exclusive prefix of that bucket over the earlier chunks;
//   starts [E + 1]:         first row of each bucket.
// The CPU kernel ignores the workspace. Python picks the chunk (jax_moe/experts.py) so that the
// counts stay small; the kernels accept any positive multiple of 32 with a large enough workspace.
constexpr int64_t kPermuteChunkAlign = 32;

MOE_HD int64_t permute_chunks(int64_t pairs, int64_t chunk) { return (pairs + chunk - 1) / chunk; }

struct PermuteWorkspace {
  int64_t chunks;  // chunks per batch
  int64_t buckets; // E + 1
  MOE_HD int64_t counts_offset(int64_t b) const { return b * buckets * chunks; }
  MOE_HD int64_t starts_offset(int64_t batches, int64_t b) const { return batches * buckets * chunks + b * buckets; }
  MOE_HD int64_t elements(int64_t batches) const { return batches * buckets * (chunks + 1); }
};

MOE_HD PermuteWorkspace permute_workspace(int64_t pairs, int64_t num_experts, int64_t chunk) {
  return {permute_chunks(pairs, chunk), num_experts + 1};
}

}  // namespace jax_moe
