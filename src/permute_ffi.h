// Buffer checks of the permute / unpermute FFI handlers, shared by the CPU and CUDA builds: a call
// with inconsistent buffers returns an FFI error before any kernel reads or writes them.
//
// Every buffer carries a leading batch dimension B (the public functions use B = 1; vmap stacks
// its batch there), so one call sorts B independent sets of tokens:
//   permute fwd:   x [B, T, H], indices s32 [B, T, k]
//                  -> x_sorted [B, n, H] (x's dtype), group_sizes s32 [B, E], sort_map s32 [B, n],
//                     pos s32 [B, n], workspace s32 [W]          (n = T·k; attrs num_experts, chunk)
//   permute bwd:   dx_sorted [B, n, H], pos s32 [B, n] -> dx [B, T, H]           (attr topk)
//   unpermute fwd: y_sorted [B, n, H], sort_map s32 [B, n], weights [B, T, k] -> y [B, T, H], pos s32 [B, n]
//   unpermute bwd: dy [B, T, H], y_sorted [B, n, H], sort_map s32 [B, n], pos s32 [B, n], weights [B, T, k]
//                  -> d y_sorted [B, n, H], d weights [B, T, k] (weights' dtype)
// Row data (x, y_sorted, ...) is float32, bfloat16 or float16; weights any of those.
#pragma once

#include <climits>
#include <initializer_list>
#include <string>

#include "ffi_helpers.h"
#include "permute_row.h"

namespace jax_moe {

struct PermuteShapes {
  Dtype dtype;     // row data
  Dtype w_dtype;   // weights (unpermute only)
  int64_t batches; // B
  int64_t tokens;  // T
  int64_t topk;    // k
  int64_t hidden;  // H
  int64_t pairs;   // n = T·k
  int64_t experts; // E (permute fwd only)
  int64_t chunk;   // pairs per sort chunk (permute fwd only)
};

namespace permute_detail {

inline ffi::Unexpected<ffi::Error> fail(const std::string& what) { return ffi::Unexpected<ffi::Error>(invalid(what)); }

inline bool dims_are(ffi::Span<const int64_t> d, std::initializer_list<int64_t> want) {
  if (d.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want)
    if (d[i++] != w) return false;
  return true;
}

inline bool s32_is(const ffi::AnyBuffer& b, std::initializer_list<int64_t> want) {
  return b.element_type() == ffi::DataType::S32 && dims_are(b.dimensions(), want);
}

inline bool rows_are(const ffi::AnyBuffer& b, Dtype dtype, std::initializer_list<int64_t> want) {
  const auto d = float_dtype(b.element_type());
  return d && *d == dtype && dims_are(b.dimensions(), want);
}

// Reads the row data [B, R, H] and the token layout [B, T, k]; checks n = T·k rows and int32 rows.
inline ffi::ErrorOr<PermuteShapes> rows_and_pairs(const ffi::AnyBuffer& rows, bool rows_are_pairs,
                                                  ffi::Span<const int64_t> tokens_dims, int64_t topk,
                                                  const char* what) {
  const auto rd = rows.dimensions();
  const auto dtype = float_dtype(rows.element_type());
  if (rd.size() != 3 || !dtype) return fail(std::string(what) + " must be a float32, bfloat16 or float16 array [B, rows, H]");
  if (tokens_dims.size() != 3) return fail(std::string(what) + ": the token buffers must be [B, T, ...]");
  PermuteShapes s{*dtype, Dtype::kF32, rd[0], tokens_dims[1], topk, rd[2], 0, 0, 0};
  if (s.topk < 1) return fail("topk must be >= 1");
  if (tokens_dims[0] != s.batches) return fail(std::string(what) + ": batch dimensions differ");
  if (s.tokens > INT32_MAX / s.topk) return fail("T·k must fit in int32");
  s.pairs = s.tokens * s.topk;
  const int64_t expect_rows = rows_are_pairs ? s.pairs : s.tokens;
  if (rd[1] != expect_rows)
    return fail(std::string(what) + " has " + std::to_string(rd[1]) + " rows, expected " +
                std::to_string(expect_rows) + " (T·k = " + std::to_string(s.tokens) + "·" + std::to_string(s.topk) + ")");
  return s;
}

}  // namespace permute_detail

inline ffi::ErrorOr<PermuteShapes> check_permute_fwd(const ffi::AnyBuffer& x, const ffi::AnyBuffer& indices,
                                                     const ffi::AnyBuffer& x_sorted, const ffi::AnyBuffer& group_sizes,
                                                     const ffi::AnyBuffer& sort_map, const ffi::AnyBuffer& pos,
                                                     const ffi::AnyBuffer& workspace, int64_t num_experts,
                                                     int64_t chunk) {
  using namespace permute_detail;
  const auto id = indices.dimensions();
  if (indices.element_type() != ffi::DataType::S32 || id.size() != 3)
    return fail("permute: indices must be int32 [B, T, k]");
  auto s = rows_and_pairs(x, false, id, id[2], "permute: x");
  if (s.has_error()) return s;
  if (num_experts < 1 || num_experts >= INT32_MAX) return fail("permute: num_experts must be in [1, 2^31 - 1)");
  if (chunk < kPermuteChunkAlign || chunk % kPermuteChunkAlign) return fail("permute: chunk must be a positive multiple of 32");
  s->experts = num_experts;
  s->chunk = chunk;
  const int64_t B = s->batches, n = s->pairs;
  if (!rows_are(x_sorted, s->dtype, {B, n, s->hidden}) || !s32_is(group_sizes, {B, num_experts}) ||
      !s32_is(sort_map, {B, n}) || !s32_is(pos, {B, n}))
    return fail("permute: outputs must be x_sorted [B, T·k, H] in x's dtype, int32 group_sizes [B, E], "
                "int32 sort_map and pos [B, T·k]");
  const int64_t need = permute_workspace(n, num_experts, chunk).elements(B);
  if (workspace.element_type() != ffi::DataType::S32 || workspace.dimensions().size() != 1 ||
      workspace.dimensions()[0] < need)
    return fail("permute: the workspace must be int32 with at least " + std::to_string(need) + " elements");
  return s;
}

inline ffi::ErrorOr<PermuteShapes> check_permute_bwd(const ffi::AnyBuffer& dx_sorted, const ffi::AnyBuffer& pos,
                                                     const ffi::AnyBuffer& dx, int64_t topk) {
  using namespace permute_detail;
  auto s = rows_and_pairs(dx_sorted, true, dx.dimensions(), topk, "permute backward: d x_sorted");
  if (s.has_error()) return s;
  if (!rows_are(dx, s->dtype, {s->batches, s->tokens, s->hidden}) || !s32_is(pos, {s->batches, s->pairs}))
    return fail("permute backward: d x must be [B, T, H] like d x_sorted and pos int32 [B, T·k]");
  return s;
}

inline ffi::ErrorOr<PermuteShapes> check_unpermute_fwd(const ffi::AnyBuffer& y_sorted, const ffi::AnyBuffer& sort_map,
                                                       const ffi::AnyBuffer& weights, const ffi::AnyBuffer& y,
                                                       const ffi::AnyBuffer& pos) {
  using namespace permute_detail;
  const auto wd = weights.dimensions();
  const auto w_dtype = float_dtype(weights.element_type());
  if (wd.size() != 3 || !w_dtype) return fail("unpermute: weights must be a float array [B, T, k]");
  auto s = rows_and_pairs(y_sorted, true, wd, wd[2], "unpermute: y_sorted");
  if (s.has_error()) return s;
  s->w_dtype = *w_dtype;
  const int64_t B = s->batches, n = s->pairs;
  if (!s32_is(sort_map, {B, n}) || !s32_is(pos, {B, n}))
    return fail("unpermute: sort_map and pos must be int32 [B, T·k]");
  if (!rows_are(y, s->dtype, {B, s->tokens, s->hidden})) return fail("unpermute: y must be [B, T, H] like y_sorted");
  return s;
}

inline ffi::ErrorOr<PermuteShapes> check_unpermute_bwd(const ffi::AnyBuffer& dy, const ffi::AnyBuffer& y_sorted,
                                                       const ffi::AnyBuffer& sort_map, const ffi::AnyBuffer& pos,
                                                       const ffi::AnyBuffer& weights, const ffi::AnyBuffer& dy_sorted,
                                                       const ffi::AnyBuffer& dweights) {
  using namespace permute_detail;
  auto s = check_unpermute_fwd(y_sorted, sort_map, weights, dy, pos);
  if (s.has_error()) return s;
  const int64_t B = s->batches;
  if (!rows_are(dy_sorted, s->dtype, {B, s->pairs, s->hidden}) ||
      !rows_are(dweights, s->w_dtype, {B, s->tokens, s->topk}))
    return fail("unpermute backward: d y_sorted must be like y_sorted and d weights like weights");
  return s;
}

}  // namespace jax_moe
