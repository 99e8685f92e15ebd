// CPU handlers of the expert primitives (SPEC §3): permute / unpermute with their backward passes,
// and the grouped matmul (forward, d lhs, d rhs) with jax.lax.ragged_dot semantics.
//
// Same functions as the CUDA kernels (permute_cuda.cu, grouped_gemm*.cu): the same stable order,
// the same hidden pos arrays, float32 accumulation in the same order over the k slots. Only the
// dot products (d weights, grouped matmul) may round differently from the GPU.
#include <algorithm>
#include <string>
#include <vector>

#include "handlers.h"
#include "permute_ffi.h"

namespace jax_moe {
namespace {

// ------------------------------------------------------------------- permute
ffi::Error permute_fwd(ffi::AnyBuffer x, ffi::AnyBuffer indices, ffi::Result<ffi::AnyBuffer> x_sorted,
                       ffi::Result<ffi::AnyBuffer> group_sizes, ffi::Result<ffi::AnyBuffer> sort_map,
                       ffi::Result<ffi::AnyBuffer> pos, ffi::Result<ffi::AnyBuffer> workspace, int64_t num_experts,
                       int64_t chunk) {
  auto shapes = check_permute_fwd(x, indices, *x_sorted, *group_sizes, *sort_map, *pos, *workspace, num_experts, chunk);
  if (shapes.has_error()) return shapes.error();
  const PermuteShapes s = *shapes;
  const int64_t E = s.experts, n = s.pairs, H = s.hidden, k = s.topk;
  const size_t row_bytes = size_t(H) * (s.dtype == Dtype::kF32 ? 4 : 2);
  const auto* idx_all = indices.typed_data<int32_t>();
  const auto* src_all = static_cast<const char*>(x.untyped_data());
  auto* dst_all = static_cast<char*>(x_sorted->untyped_data());
  std::vector<int64_t> next(E + 1);
  for (int64_t b = 0; b < s.batches; ++b) {
    const int32_t* idx = idx_all + b * n;
    int32_t* gs = group_sizes->typed_data<int32_t>() + b * E;
    int32_t* sm = sort_map->typed_data<int32_t>() + b * n;
    int32_t* ps = pos->typed_data<int32_t>() + b * n;
    // Counting sort over E + 1 buckets: counts, exclusive prefix, then rows in pair order.
    std::fill(next.begin(), next.end(), 0);
    for (int64_t p = 0; p < n; ++p) ++next[pair_key(idx[p], E)];
    for (int64_t e = 0; e < E; ++e) gs[e] = int32_t(next[e]);
    int64_t start = 0;
    for (int64_t e = 0; e <= E; ++e) std::swap(start, next[e]), start += next[e];
    for (int64_t p = 0; p < n; ++p) {
      const int32_t key = pair_key(idx[p], E);
      const int64_t row = next[key]++;
      sm[row] = int32_t(p);
      ps[p] = encode_pos(int32_t(row), key < E);
    }
    // Row copies: x[t] to each valid pair's row, zeros to the others.
    const char* src = src_all + b * s.tokens * row_bytes;
    char* dst = dst_all + b * n * row_bytes;
    for (int64_t p = 0; p < n; ++p) {
      char* out = dst + pos_row(ps[p]) * row_bytes;
      if (pos_valid(ps[p]))
        std::copy_n(src + (p / k) * row_bytes, row_bytes, out);
      else
        std::fill_n(out, row_bytes, char(0));
    }
  }
  return ffi::Error::Success();
}

// out[t] = Σ_j scale(t, j) · rows[pos[t·k + j]] over the slots with a row (pos >= 0), float32
// accumulation in slot order. The permute backward (scale 1) and the unpermute forward.
template <class In, class Scale>
void combine_rows(const PermuteShapes& s, const void* rows_all, const int32_t* pos_all, void* out_all, Scale scale) {
  using S = typename In::storage;
  const int64_t n = s.pairs, H = s.hidden, k = s.topk;
  std::vector<float> acc(H);
  for (int64_t b = 0; b < s.batches; ++b) {
    const S* rows = static_cast<const S*>(rows_all) + b * n * H;
    const int32_t* pos = pos_all + b * n;
    for (int64_t t = 0; t < s.tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t r = pos[t * k + j];
        if (r < 0 || r >= n) continue;
        const float w = scale(b, t, j);
        const S* row = rows + r * H;
        for (int64_t h = 0; h < H; ++h) acc[h] += w * In::to_float(row[h]);
      }
      S* out = static_cast<S*>(out_all) + (b * s.tokens + t) * H;
      for (int64_t h = 0; h < H; ++h) out[h] = In::from_float(acc[h]);
    }
  }
}

ffi::Error permute_bwd(ffi::AnyBuffer dx_sorted, ffi::AnyBuffer pos, ffi::Result<ffi::AnyBuffer> dx, int64_t topk) {
  auto shapes = check_permute_bwd(dx_sorted, pos, *dx, topk);
  if (shapes.has_error()) return shapes.error();
  const PermuteShapes s = *shapes;
  return dispatch_float(s.dtype, [&]<class In>() {
    // Invalid pairs are encoded negative: skipped, as their rows of x_sorted are constant zeros.
    combine_rows<In>(s, dx_sorted.untyped_data(), pos.typed_data<int32_t>(), dx->untyped_data(),
                     [](int64_t, int64_t, int64_t) { return 1.0f; });
    return ffi::Error::Success();
  });
}

// ----------------------------------------------------------------- unpermute
// pos[p] = the largest row r with sort_map[r] = p, or -1 (a permutation has exactly one).
void invert_sort_map(const PermuteShapes& s, const int32_t* sort_map, int32_t* pos) {
  const int64_t n = s.pairs;
  std::fill(pos, pos + s.batches * n, -1);
  for (int64_t b = 0; b < s.batches; ++b)
    for (int64_t r = 0; r < n; ++r) {
      const int32_t p = sort_map[b * n + r];
      if (p >= 0 && p < n) pos[b * n + p] = std::max(pos[b * n + p], int32_t(r));
    }
}

ffi::Error unpermute_fwd(ffi::AnyBuffer y_sorted, ffi::AnyBuffer sort_map, ffi::AnyBuffer weights,
                         ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> pos) {
  auto shapes = check_unpermute_fwd(y_sorted, sort_map, weights, *y, *pos);
  if (shapes.has_error()) return shapes.error();
  const PermuteShapes s = *shapes;
  int32_t* ps = pos->typed_data<int32_t>();
  invert_sort_map(s, sort_map.typed_data<int32_t>(), ps);
  const void* w = weights.untyped_data();
  return dispatch_float(s.dtype, [&]<class In>() {
    combine_rows<In>(s, y_sorted.untyped_data(), ps, y->untyped_data(), [&](int64_t b, int64_t t, int64_t j) {
      return load_float(w, (b * s.tokens + t) * s.topk + j, s.w_dtype);
    });
    return ffi::Error::Success();
  });
}

ffi::Error unpermute_bwd(ffi::AnyBuffer dy, ffi::AnyBuffer y_sorted, ffi::AnyBuffer sort_map, ffi::AnyBuffer pos,
                         ffi::AnyBuffer weights, ffi::Result<ffi::AnyBuffer> dy_sorted,
                         ffi::Result<ffi::AnyBuffer> dweights) {
  auto shapes = check_unpermute_bwd(dy, y_sorted, sort_map, pos, weights, *dy_sorted, *dweights);
  if (shapes.has_error()) return shapes.error();
  const PermuteShapes s = *shapes;
  const int64_t n = s.pairs, H = s.hidden, k = s.topk;
  const int32_t* ps_all = pos.typed_data<int32_t>();
  const void* w = weights.untyped_data();
  void* dw = dweights->untyped_data();
  return dispatch_float(s.dtype, [&]<class In>() {
    using S = typename In::storage;
    // Rows that hold no pair (only when sort_map is not a permutation) get a zero gradient.
    std::fill_n(static_cast<S*>(dy_sorted->untyped_data()), s.batches * n * H, In::from_float(0.0f));
    for (int64_t b = 0; b < s.batches; ++b) {
      const S* ys = static_cast<const S*>(y_sorted.untyped_data()) + b * n * H;
      S* dys = static_cast<S*>(dy_sorted->untyped_data()) + b * n * H;
      const int32_t* ps = ps_all + b * n;
      for (int64_t t = 0; t < s.tokens; ++t) {
        const S* g = static_cast<const S*>(dy.untyped_data()) + (b * s.tokens + t) * H;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t wi = (b * s.tokens + t) * k + j;
          const int32_t r = ps[t * k + j];
          float dot = 0.0f;
          if (r >= 0 && r < n) {
            const float wj = load_float(w, wi, s.w_dtype);
            for (int64_t h = 0; h < H; ++h) {
              const float gh = In::to_float(g[h]);
              dot += gh * In::to_float(ys[r * H + h]);
              dys[r * H + h] = In::from_float(wj * gh);
            }
          }
          store_float(dw, wi, dot, s.w_dtype);
        }
      }
    }
    return ffi::Error::Success();
  });
}

// ------------------------------------------------------------ grouped matmul
enum class GmmOp { kForward, kGradLhs, kGradRhs };

std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// Clamped row ranges: group g holds rows [start[g], start[g + 1]); negative sizes count as 0 and
// the running sum is cut at M, as grouped_gemm.h specifies for the GPU.
std::vector<int64_t> group_starts(const int32_t* sizes, int64_t G, int64_t M) {
  std::vector<int64_t> start(G + 1);
  int64_t sum = 0;
  for (int64_t g = 0; g < G; ++g) {
    start[g] = std::min(sum, M);
    sum += std::max<int32_t>(sizes[g], 0);
  }
  start[G] = std::min(sum, M);
  return start;
}

template <class In>
void gmm_typed(GmmOp op, const void* a_ptr, const void* b_ptr, const std::vector<int64_t>& start, void* out_ptr,
               int64_t M, int64_t K, int64_t N, int64_t G) {
  using S = typename In::storage;
  const S* a = static_cast<const S*>(a_ptr);
  const S* b = static_cast<const S*>(b_ptr);
  S* out = static_cast<S*>(out_ptr);
  const S zero = In::from_float(0.0f);
  if (op == GmmOp::kForward) {  // out[r, :] = lhs[r, :] @ rhs[g]
    std::vector<float> acc(N);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = start[g]; r < start[g + 1]; ++r) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t kk = 0; kk < K; ++kk) {
          const float v = In::to_float(a[r * K + kk]);
          const S* rhs = b + (g * K + kk) * N;
          for (int64_t j = 0; j < N; ++j) acc[j] += v * In::to_float(rhs[j]);
        }
        for (int64_t j = 0; j < N; ++j) out[r * N + j] = In::from_float(acc[j]);
      }
    std::fill(out + start[G] * N, out + M * N, zero);
  } else if (op == GmmOp::kGradLhs) {  // out[r, kk] = dout[r, :] · rhs[g, kk, :]
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = start[g]; r < start[g + 1]; ++r)
        for (int64_t kk = 0; kk < K; ++kk) {
          const S* rhs = b + (g * K + kk) * N;
          float acc = 0.0f;
          for (int64_t j = 0; j < N; ++j) acc += In::to_float(a[r * N + j]) * In::to_float(rhs[j]);
          out[r * K + kk] = In::from_float(acc);
        }
    std::fill(out + start[G] * K, out + M * K, zero);
  } else {  // out[g] = lhs_g^T @ dout_g, zeros for empty groups
    std::vector<float> acc(K * N);
    for (int64_t g = 0; g < G; ++g) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t r = start[g]; r < start[g + 1]; ++r)
        for (int64_t kk = 0; kk < K; ++kk) {
          const float v = In::to_float(a[r * K + kk]);
          const S* dout = b + r * N;
          float* row = acc.data() + kk * N;
          for (int64_t j = 0; j < N; ++j) row[j] += v * In::to_float(dout[j]);
        }
      for (int64_t i = 0; i < K * N; ++i) out[g * K * N + i] = In::from_float(acc[i]);
    }
  }
}

template <GmmOp Op>
ffi::Error grouped_matmul(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Buffer<ffi::DataType::S32> group_sizes,
                          ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> workspace) {
  const std::string name = Op == GmmOp::kForward   ? "grouped_matmul"
                           : Op == GmmOp::kGradLhs ? "grouped_matmul d lhs"
                                                   : "grouped_matmul d rhs";
  const auto dtype = float_dtype(a.element_type());
  if (!dtype || b.element_type() != a.element_type() || out->element_type() != a.element_type())
    return invalid(name + ": operands and result must share one dtype among float32, bfloat16, float16");
  if (workspace->element_type() != ffi::DataType::U8 || workspace->dimensions().size() != 1)
    return invalid(name + ": workspace must be a rank-1 uint8 buffer");
  if (group_sizes.dimensions().size() != 1) return invalid(name + ": group_sizes must be rank 1");
  const auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  const int64_t G = group_sizes.dimensions()[0];
  int64_t M = 0, K = 0, N = 0;
  bool ok = ad.size() == 2 && bd.size() == (Op == GmmOp::kGradRhs ? 2u : 3u);
  if (ok) {
    if constexpr (Op == GmmOp::kForward) {  // lhs [M, K], rhs [G, K, N] -> [M, N]
      M = ad[0], K = ad[1], N = bd[2];
      ok = permute_detail::dims_are(bd, {G, K, N}) && permute_detail::dims_are(od, {M, N});
    } else if constexpr (Op == GmmOp::kGradLhs) {  // dout [M, N], rhs [G, K, N] -> [M, K]
      M = ad[0], N = ad[1], K = bd[1];
      ok = permute_detail::dims_are(bd, {G, K, N}) && permute_detail::dims_are(od, {M, K});
    } else {  // lhs [M, K], dout [M, N] -> [G, K, N]
      M = ad[0], K = ad[1], N = bd[1];
      ok = permute_detail::dims_are(bd, {M, N}) && permute_detail::dims_are(od, {G, K, N});
    }
  }
  if (!ok)
    return invalid(name + ": inconsistent shapes a=" + dims_str(ad) + " b=" + dims_str(bd) +
                   " group_sizes=" + dims_str(group_sizes.dimensions()) + " out=" + dims_str(od));
  const std::vector<int64_t> start = group_starts(group_sizes.typed_data(), G, M);
  return dispatch_float(*dtype, [&]<class In>() {
    gmm_typed<In>(Op, a.untyped_data(), b.untyped_data(), start, out->untyped_data(), M, K, N, G);
    return ffi::Error::Success();
  });
}

template <class Binding>
auto bind_gmm(Binding b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::DataType::S32>>()
      .template Ret<ffi::AnyBuffer>()
      .template Ret<ffi::AnyBuffer>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_permute_fwd_cpu, permute_fwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("num_experts")
                                  .Attr<int64_t>("chunk"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_permute_bwd_cpu, permute_bwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("topk"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_unpermute_fwd_cpu, unpermute_fwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_unpermute_bwd_cpu, unpermute_bwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_gmm_fwd_cpu, grouped_matmul<GmmOp::kForward>, bind_gmm(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_gmm_dlhs_cpu, grouped_matmul<GmmOp::kGradLhs>, bind_gmm(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_gmm_drhs_cpu, grouped_matmul<GmmOp::kGradRhs>, bind_gmm(ffi::Ffi::Bind()));

}  // namespace jax_moe
