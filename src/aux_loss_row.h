// Load-balancing aux loss (SPEC §2): the math of one token row and the order of the deterministic sums,
// written once for the CPU and CUDA kernels.
//
// Row algorithms take a `Lanes` policy, as in routing_row.h: one lane on the CPU, a warp or a smaller
// group of a warp's lanes on CUDA. They need only lane, nlanes, leader(), sync(), max, sum and best, so
// the routing kernels' policies can run them too. Every reduction is over a fixed assignment of elements to lanes followed by
// the policy's fixed-shape reduction: results never depend on timing.
#pragma once

#include "routing_row.h"

namespace jax_moe {

// ----------------------------------------------------------------- counts
// tokens_per_expert as the kernels read it: float32 or int32 (exact as float below 2^24).
struct Counts {
  const void* data;
  bool is_int;
  MOE_HD float convert(float raw) const { return is_int ? float(int32_t(float_bits(raw))) : raw; }
  MOE_HD float operator()(int64_t i) const { return convert(static_cast<const float*>(data)[i]); }
};

// Counts times a factor: the d scores of the aux loss, scale · tpe[e].
struct ScaledCounts {
  Counts counts;
  float scale;
  MOE_HD float operator()(int64_t i) const { return scale * counts(i); }
};

// A chunk of counts: with 16-byte loads on the GPU where aligned (a load per element costs the
// streaming kernels more L1 traffic than the row itself).
template <int N>
MOE_HD void weights_at(const Counts& c, int64_t e0, float (&w)[N]) {
  const float* p = static_cast<const float*>(c.data) + e0;
#ifdef __CUDA_ARCH__
  if constexpr (N % 4 == 0) {
    if (aligned16(p)) {
#pragma unroll
      for (int q = 0; q < N / 4; ++q) {
        const float4 f = reinterpret_cast<const float4*>(p)[q];
        w[4 * q] = c.convert(f.x), w[4 * q + 1] = c.convert(f.y);
        w[4 * q + 2] = c.convert(f.z), w[4 * q + 3] = c.convert(f.w);
      }
      return;
    }
  }
#endif
#pragma unroll
  for (int j = 0; j < N; ++j) w[j] = c.convert(p[j]);
}

template <int N>
MOE_HD void weights_at(const ScaledCounts& c, int64_t e0, float (&w)[N]) {
  weights_at(c.counts, e0, w);
#pragma unroll
  for (int j = 0; j < N; ++j) w[j] *= c.scale;
}

// ------------------------------------------------------------ clean scores
// The aux loss's scores of a row (SPEC §2): softmax(x), or a(x) / (Σ_E a + ε) with a = sigmoid or
// sqrtsoftplus: s_e = numerator(x_e) · (1 / denominator), a multiplication per element where a
// division would cost the GPU kernels ~8 instructions (the two differ by at most an ulp).
struct CleanStats {
  ScoreFunction f;
  float mx;         // softmax: the row maximum; unused otherwise
  float inv_denom;  // 1 / (softmax: Σ exp(x - mx); otherwise Σ a + ε)
  MOE_HD float numerator(float x) const {
    return f == ScoreFunction::kSoftmax ? expf(x - mx) : elementwise_score(f, x);
  }
  MOE_HD float score(float x) const { return numerator(x) * inv_denom; }
};

// One lane's running sums of a row in a single pass: Σ q and Σ q·v(e) for the numerators q. For softmax
// q = exp(x - m) with m the running maximum, updated (and the sums rescaled) once per chunk.
struct RowSums {
  float m = -INFINITY;
  float sum = 0.0f;
  float dot = 0.0f;

  template <int N, class V>
  MOE_HD void add_softmax(int64_t e0, const float (&x)[N], V v) {
    float mc = m;  // fmaxf skips NaN: a NaN reaches the sums instead
#pragma unroll
    for (int j = 0; j < N; ++j) mc = fmaxf(mc, x[j]);
    const float c = mc == m ? 1.0f : fast_exp(m - mc);  // 0 while m is -inf
    sum *= c;
    dot *= c;
    m = mc;
    float w[N];
    weights_at(v, e0, w);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float q = x[j] == -INFINITY ? 0.0f : fast_exp(x[j] - m);  // no -inf - -inf
      sum += q;
      dot += q * w[j];
    }
  }

  template <int N, class V>
  MOE_HD void add_elementwise(ScoreFunction f, int64_t e0, const float (&x)[N], V v) {
    float w[N];
    weights_at(v, e0, w);
    with_elementwise_function(f, [&]<ScoreFunction F>() {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float q = elementwise_score(F, x[j]);
        sum += q;
        dot += q * w[j];
      }
    });
  }

  // Combines the lanes' sums. Softmax follows the max-subtracted formula (jax.nn.softmax): a row
  // whose maximum is not finite (+inf, or all -inf) gives NaN, as does any NaN.
  template <class Lanes>
  MOE_HD RowSums reduce_softmax(const Lanes& L) const {
    const float M = L.max(m);
    const float c = m == -INFINITY ? 0.0f : fast_exp(m - M);
    RowSums r{M, L.sum(sum * c), L.sum(dot * c)};
    if (!(M > -INFINITY && M < INFINITY)) r.sum = NAN;
    return r;
  }
  template <class Lanes>
  MOE_HD RowSums reduce(const Lanes& L) const {
    return {0.0f, L.sum(sum), L.sum(dot)};
  }
};

// Row sums of a walk's pieces (row_access.h: from memory or a copy): Σ numerator and Σ numerator · v(e),
// combined over the lanes.
template <class Lanes, class Walk, class V>
MOE_HD RowSums row_sums_of(const Lanes& L, ScoreFunction f, const Walk& walk, V v) {
  RowSums r;
  if (f == ScoreFunction::kSoftmax) {
    walk([&](int64_t e0, const auto& xv) { r.add_softmax(e0, xv, v); });
    return r.reduce_softmax(L);
  }
  walk([&](int64_t e0, const auto& xv) { r.add_elementwise(f, e0, xv, v); });
  return r.reduce(L);
}

// Row sums in one pass over x.
template <class Lanes, class In, class V>
MOE_HD RowSums row_sums(const Lanes& L, ScoreFunction f, const typename In::storage* x, int64_t n, V v) {
  return row_sums_of(L, f, row_walk<Lanes, In>(L, x, n), v);
}

// The statistics of a row's clean scores, from one pass over it.
template <class Lanes, class In>
MOE_HD CleanStats clean_stats(const Lanes& L, ScoreFunction f, const typename In::storage* x, int64_t n) {
  const RowSums r = row_sums<Lanes, In>(L, f, x, n, [](int64_t) { return 0.0f; });
  return {f, r.m, 1.0f / (f == ScoreFunction::kSoftmax ? r.sum : r.sum + kEps)};
}

// Σ_e s_e · w(e) of one row, from one pass over it.
template <class Lanes, class In, class W>
MOE_HD float clean_dot(const Lanes& L, ScoreFunction f, const typename In::storage* x, int64_t n, W w) {
  const RowSums r = row_sums<Lanes, In>(L, f, x, n, w);
  return r.dot / (f == ScoreFunction::kSoftmax ? r.sum : r.sum + kEps);
}

// d logits of a row's clean scores for d scores g(e) (SPEC §2 / TE's aux-score backward), element by
// element once one pass has summed the row: softmax dx = p (g - Σ g p); otherwise dx = h · da/dx
// with h = g / (S + ε) - Σ g a / (S + ε)².
struct CleanGrad {
  ScoreFunction f;
  float m, inv_sum;  // softmax: the row maximum and 1 / Σ exp(x - m)
  float gp;          // softmax: Σ g p
  RenormGrad rg;     // elementwise scores: h(g)

  template <ScoreFunction F>
  MOE_HD float dx_as(float x, float g) const {
    if constexpr (F == ScoreFunction::kSoftmax)
      return fast_exp(x - m) * inv_sum * (g - gp);
    else
      return rg.h(g) * elementwise_score_grad(F, x, elementwise_score(F, x));
  }
  MOE_HD float dx(float x, float g) const {
    float y;
    with_score_function(f, [&]<ScoreFunction F>() { y = dx_as<F>(x, g); });
    return y;
  }
  // y[j] = dx(x[j], g[j]) for a piece of the row, the score function chosen once.
  template <int N>
  MOE_HD void dx_piece(const float (&x)[N], const float (&g)[N], float (&y)[N]) const {
    with_score_function(f, [&]<ScoreFunction F>() {
#pragma unroll
      for (int j = 0; j < N; ++j) y[j] = dx_as<F>(x[j], g[j]);
    });
  }
};

// The backward of a row's clean scores from its sums (RowSums with v = the d scores).
MOE_HD CleanGrad clean_grad_of(ScoreFunction f, const RowSums& r) {
  return {f, r.m, 1.0f / r.sum, r.dot / r.sum, renorm_grad(true, r.sum, r.dot)};
}

// d logits of the row a walk visits, given d scores g(e), written to every dx[e] as Out: walks it twice,
// for its sums, then for d logits (known_aligned: as in map_pieces).
template <class Lanes, class Out, class Walk, class G>
MOE_HD void clean_scores_bwd_of(const Lanes& L, ScoreFunction f, const Walk& walk, G g, typename Out::storage* dx,
                                bool known_aligned) {
  const CleanGrad cg = clean_grad_of(f, row_sums_of(L, f, walk, g));
  map_pieces_weighted<Out>(walk, dx, known_aligned, g,
                           [&](const auto& xv, const auto& gv, auto& y) { cg.dx_piece(xv, gv, y); });
}

// d logits of one row in memory.
template <class Lanes, class In, class G>
MOE_HD void clean_scores_bwd_row(const Lanes& L, ScoreFunction f, const typename In::storage* x, int64_t n, G g,
                                 typename In::storage* dx) {
  clean_scores_bwd_of<Lanes, In>(L, f, row_walk<Lanes, In>(L, x, n), g, dx, false);
}

// ------------------------------------------------------------------ top-k
// Top-k by enumeration costs k passes over the row; past this k, a threshold search (about
// 34 + log2(E) passes) is cheaper.
constexpr int64_t kEnumerateTopk = 32;

// The best candidate ranking strictly after `bound`, with keys given by key(e) (see best_after).
template <class Lanes, class Key>
MOE_HD Cand best_key_after(const Lanes& L, int64_t n, Key key, Cand bound) {
  Cand best = no_cand();
  for (int64_t e = L.lane; e < n; e += L.nlanes) {
    const Cand c{key(e), int32_t(e)};
    if (before(bound, c) && before(c, best)) best = c;
  }
  return L.best(best);
}

// How many e in [0, n) satisfy pred, counted in float (exact: n <= 2^24 is checked by the handlers).
template <class Lanes, class Pred>
MOE_HD int64_t count_where(const Lanes& L, int64_t n, Pred pred) {
  float c = 0.0f;
  for (int64_t e = L.lane; e < n; e += L.nlanes) c += pred(e) ? 1.0f : 0.0f;
  return int64_t(L.sum(c));
}

// Calls visit(e) once for each of the k experts that rank first by key(e) (higher key first, ties to the
// lower index: SPEC §1.4 when key = rank_key(score)); keys must be >= 1. Which lane visits an expert is
// unspecified, so visit must be safe to call from several lanes at once (the CUDA kernels count with
// atomics). Needs 1 <= k <= n.
template <class Lanes, class Key, class Visit>
MOE_HD void for_each_topk(const Lanes& L, int64_t n, int64_t k, Key key, Visit visit) {
  if (k <= kEnumerateTopk) {
    Cand b = start_bound();
    for (int64_t j = 0; j < k; ++j) {
      b = best_key_after(L, n, key, b);
      if (L.leader()) visit(int64_t(b.idx));
    }
    return;
  }
  // K = the k-th largest key: the largest value with at least k keys >= K, found bit by bit.
  uint32_t K = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = K | (1u << bit);
    if (count_where(L, n, [&](int64_t e) { return key(e) >= cand; }) >= k) K = cand;
  }
  // Every key above K is chosen; the lowest indices among keys equal to K fill the rest: the smallest
  // m with `need` of them below m.
  const int64_t need = k - count_where(L, n, [&](int64_t e) { return key(e) > K; });
  int64_t lo = 0, hi = n;  // count(lo) < need <= count(hi)
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (count_where(L, mid, [&](int64_t e) { return key(e) == K; }) >= need)
      hi = mid;
    else
      lo = mid;
  }
  for (int64_t e = L.lane; e < n; e += L.nlanes) {
    const uint32_t ke = key(e);
    if (ke > K || (ke == K && e < hi)) visit(e);
  }
}

// Scores of one row written to `scores` (float32), then visit(e) for its top-k experts by those scores.
// `keys` (optional, n entries) receives the scores' ranking keys, a faster copy to rank from; without
// it the ranking reads the scores back.
template <class Lanes, class In, class Visit>
MOE_HD void aux_scores_row(const Lanes& L, ScoreFunction f, int64_t k, const typename In::storage* x, int64_t n,
                           float* scores, uint32_t* keys, Visit visit) {
  const CleanStats st = clean_stats<Lanes, In>(L, f, x, n);
  map_row<Lanes, In, F32>(L, x, n, scores, [&](int64_t e, float xe) {
    const float s = st.score(xe);
    if (keys) keys[e] = rank_key(s);
    return s;
  });
  L.sync();  // the ranking reads what other lanes wrote
  if (keys)
    for_each_topk(L, n, k, [&](int64_t e) { return keys[e]; }, visit);
  else
    for_each_topk(L, n, k, [&](int64_t e) { return rank_key(scores[e]); }, visit);
}

// ------------------------------------------------------- deterministic sums
// The loss is one float sum over many items (vectors of probs, or token rows), reduced in two stages
// whose order depends on the shapes alone:
//  * stage 1: `blocks` = sum_blocks(items, slots per block) blocks of kSumThreads threads; item i goes to
//    slot i % (blocks * slots per block) and each slot adds its items in increasing order to 0.0f. A slot
//    is a thread (probs: 32 slots per warp) or a group of row_lanes(E) lanes working on one token row at
//    a time (logits: 32 / row_lanes slots per warp); slot s is in warp s / (slots per warp). A block
//    adds its slots with block_sum_of_slots below and writes the partial to the workspace.
//  * stage 2: the partials are added in one block the same way: thread t adds partials t, t + 256, ...,
//    then block_sum_of_slots.
// The CUDA kernels run this with warp shuffles; the CPU handlers replay the same float operations in the
// same order, so on hosts that do not contract a*b+c into an FMA (x86-64 builds) the probs loss is
// bit-identical on both platforms. No float atomics anywhere: bit-identical run after run.
constexpr int kSumThreads = 256;           // threads of a reducing block: 8 warps
constexpr int kSumWarps = kSumThreads / 32;
constexpr int64_t kMaxSumBlocks = 1024;    // the most stage-1 blocks, hence partials
constexpr int64_t kSumWorkspace = kMaxSumBlocks + 1;  // partials, then a uint32 block counter

MOE_HD int64_t sum_blocks(int64_t items, int64_t slots_per_block) {
  const int64_t b = (items + slots_per_block - 1) / slots_per_block;
  return b < kMaxSumBlocks ? b : kMaxSumBlocks;
}

// acc + p * w with the product rounded first (the CUDA build must not fuse it: see above).
MOE_HD float add_product(float acc, float p, float w) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(acc, __fmul_rn(p, w));
#else
  return acc + p * w;
#endif
}

// The first of n values after an xor butterfly over them (v[l] += v[l ^ off] for off = n/2, ..., 1; n a
// power of two): host replay of a warp's shuffle sum over n lanes, or over n groups of lanes that each
// hold one value. Overwrites v.
inline float butterfly_sum(float* v, int n) {
  for (int off = n / 2; off; off >>= 1)
    for (int l = 0; l < off; ++l) v[l] = v[l] + v[l + off];
  return v[0];
}

// Host replay of a block's sum of its slots, per_warp slots a warp (32: threads; 32 / row_lanes: row
// groups): a butterfly over each warp's slots, then one over the warp sums, zero-padded to 32.
// Overwrites slots.
inline float block_sum_of_slots(float* slots, int per_warp) {
  float warps[32] = {};
  for (int w = 0; w < kSumWarps; ++w) warps[w] = butterfly_sum(slots + per_warp * w, per_warp);
  return butterfly_sum(warps, 32);
}

// Host replay of stage 2.
inline float sum_partials(const float* partials, int64_t n) {
  float acc[kSumThreads] = {};
  for (int64_t i = 0; i < n; ++i) acc[i % kSumThreads] = acc[i % kSumThreads] + partials[i];
  return block_sum_of_slots(acc, 32);
}

// Lanes working on one token row in the CUDA row kernels: a power of two from 4 to 32, at most the
// row's number of 16-byte chunks, so short rows keep the warp busy with several rows at once.
MOE_HD int row_lanes(int64_t experts, int64_t elem_bytes) {
  const int64_t chunks = (experts * elem_bytes + 15) / 16;
  int w = 4;
  while (w < 32 && 2 * w <= chunks) w *= 2;
  return w;
}

// Elements per probs vector: the widest of at most 16 bytes that divides C (a vector never spans rows).
MOE_HD int probs_vector_width(int64_t cols, int64_t elem_bytes) {
  int v = int(16 / elem_bytes);
  while (v > 1 && cols % v) v /= 2;
  return v;
}

}  // namespace jax_moe
