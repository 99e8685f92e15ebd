// Routing of one token row, forward and backward, written once for every platform.
//
// The algorithms are parameterised by a `Lanes` policy: the CPU runs them with one lane, the CUDA
// fallback kernel with the 32 lanes of a warp. A policy provides `lane`, `nlanes`, `leader()`,
// `sync()` (orders the lanes' memory accesses) and warp-uniform reductions `max`, `sum` and
// `best` (the candidate that ranks first, see ranks_before).
//
// The forward keeps a per-row scratch of E ranking keys, E carried values and G group keys, so
// its cost is O((topk + num_groups * group_score_topn) * E / nlanes) per row: simple and exact
// for any configuration. The CUDA fast path (routing_cuda.cu) covers the common shapes.
#pragma once

#include <climits>

#include "moe_math.h"
#include "row_access.h"

namespace jax_moe {

struct Cand {
  uint32_t key;
  int32_t idx;
};

// One lane: the row algorithms run sequentially (the CPU, and CUDA's thread-per-token paths).
struct SerialLanes {
  static constexpr int lane = 0, nlanes = 1;
  MOE_HD bool leader() const { return true; }
  MOE_HD void sync() const {}
  MOE_HD float max(float v) const { return v; }
  MOE_HD float sum(float v) const { return v; }
  MOE_HD Cand best(Cand c) const { return c; }
};

// Ranks after every real candidate: the result of a search that found nothing.
MOE_HD Cand no_cand() { return {kExcluded, INT32_MAX}; }
// Ranks before every real candidate: the bound that starts a search.
MOE_HD Cand start_bound() { return {0xffffffffu, -1}; }
MOE_HD bool before(Cand a, Cand b) { return ranks_before(a.key, a.idx, b.key, b.idx); }

// The best candidate of keys[begin, end) ranking strictly after `bound`. Repeated calls with the
// previous result as the bound enumerate candidates in rank order without marking any.
template <class Lanes>
MOE_HD Cand best_after(const Lanes& L, const uint32_t* keys, int64_t begin, int64_t end, Cand bound) {
  Cand best = no_cand();
  for (int64_t i = begin + L.lane; i < end; i += L.nlanes) {
    const Cand c{keys[i], int32_t(i)};
    if (c.key != kExcluded && before(bound, c) && before(c, best)) best = c;
  }
  return L.best(best);
}

// The expert bias as float, read in its own dtype (null: no bias).
struct BiasLoader {
  const void* data;
  Dtype dtype;
  MOE_HD float operator()(int64_t e) const { return data ? load_float(data, e, dtype) : 0.0f; }
};

struct RouteScratch {
  uint32_t* key;   // [E] selection key of each expert, kExcluded once its group is dropped
  float* val;      // [E] carried value (score, or logit for softmax-post)
  uint32_t* gkey;  // [G] group keys
};

// Softmax statistics of a row: max and sum of exp(x - max). NaN propagates through the sum.
template <class Lanes, class In>
MOE_HD void row_softmax_stats(const Lanes& L, const typename In::storage* x, int64_t n, float* mx, float* sum) {
  float m = -INFINITY;
  for (int64_t e = L.lane; e < n; e += L.nlanes) m = fmaxf(m, In::to_float(x[e]));
  m = L.max(m);
  float s = 0.0f;
  for (int64_t e = L.lane; e < n; e += L.nlanes) s += expf(In::to_float(x[e]) - m);
  *mx = m;
  *sum = L.sum(s);
}

// Turns the carried values of the k chosen experts into weights (serial: run by one lane).
MOE_HD void finalize_weights(const RouteConfig& c, float* w) {
  const int64_t k = c.topk;
  if (c.softmax_post()) {
    float m = -INFINITY, s = 0.0f;
    for (int64_t j = 0; j < k; ++j) m = fmaxf(m, w[j]);
    for (int64_t j = 0; j < k; ++j) s += (w[j] = expf(w[j] - m));
    for (int64_t j = 0; j < k; ++j) w[j] /= s;
  } else if (c.renormalize) {
    float s = 0.0f;
    for (int64_t j = 0; j < k; ++j) s += w[j];
    for (int64_t j = 0; j < k; ++j) w[j] /= s + kEps;
  }
  for (int64_t j = 0; j < k; ++j) w[j] *= c.scaling_factor;
}

// Drops the experts of every group outside the group_topk best (SPEC §1 step 3).
template <class Lanes>
MOE_HD void keep_best_groups(const Lanes& L, const RouteConfig& c, RouteScratch s) {
  const int64_t G = c.num_groups, gs = c.group_size();
  for (int64_t g = 0; g < G; ++g) {
    float total = 0.0f;
    Cand b = start_bound();
    for (int64_t r = 0; r < c.group_score_topn; ++r) {
      b = best_after(L, s.key, g * gs, (g + 1) * gs, b);
      total += key_value(b.key);
    }
    if (L.leader()) s.gkey[g] = rank_key(total);
  }
  L.sync();
  Cand last_kept = start_bound();
  for (int64_t p = 0; p < c.group_topk; ++p) last_kept = best_after(L, s.gkey, 0, G, last_kept);
  for (int64_t e = L.lane; e < c.num_experts; e += L.nlanes) {
    const int64_t g = e / gs;
    if (before(last_kept, Cand{s.gkey[g], int32_t(g)})) s.key[e] = kExcluded;
  }
  L.sync();
}

// Forward of one row: indices in rank order and their weights (SPEC §1 steps 1-7).
template <class Lanes, class In>
MOE_HD void route_row(const Lanes& L, const RouteConfig& c, const typename In::storage* x, BiasLoader bias,
                      RouteScratch s, float* w_out, int32_t* idx_out) {
  const int64_t E = c.num_experts;
  const bool softmax = c.score_function == ScoreFunction::kSoftmax;
  float mx = 0.0f, sum = 1.0f;
  if (softmax) row_softmax_stats<Lanes, In>(L, x, E, &mx, &sum);
  for (int64_t e = L.lane; e < E; e += L.nlanes) {
    const float xe = In::to_float(x[e]);
    const float score = softmax ? expf(xe - mx) / sum : elementwise_score(c.score_function, xe);
    const float v = carried_value(c, xe, score);
    s.val[e] = v;
    s.key[e] = rank_key(v + bias(e));
  }
  L.sync();
  if (c.num_groups > 0) keep_best_groups(L, c, s);
  Cand b = start_bound();
  for (int64_t j = 0; j < c.topk; ++j) {
    b = best_after(L, s.key, 0, E, b);
    if (L.leader()) {
      idx_out[j] = b.idx;
      w_out[j] = s.val[b.idx];
    }
  }
  if (L.leader()) finalize_weights(c, w_out);
}

// The backward of one row (SPEC §1 "Backward") once its statistics are known: the gradient of a
// chosen expert, and the base gradient of every expert (zero except for softmax-pre).
template <class In>
struct RouteRowGrad {
  const RouteConfig* c;
  const typename In::storage* x;
  const int32_t* idx;
  const float* dw;
  bool pre, post;
  float mx, sum;   // softmax statistics: the whole row (pre) or the chosen logits (post)
  RenormGrad rg;
  float shp;       // softmax Jacobian term sum_R h p (pre and post)

  MOE_HD bool chosen_valid(int64_t j) const { return idx[j] >= 0 && idx[j] < c->num_experts; }
  MOE_HD float logit(int64_t j) const { return chosen_valid(j) ? In::to_float(x[idx[j]]) : NAN; }
  // v_j: the value the j-th chosen expert carried into normalisation.
  MOE_HD float value(int64_t j) const {
    const float xj = logit(j);
    return (pre || post) ? expf(xj - mx) / sum : elementwise_score(c->score_function, xj);
  }
  MOE_HD float h(int64_t j) const { return rg.h(c->scaling_factor * dw[j]); }
  MOE_HD float base(float xe) const { return pre ? -(expf(xe - mx) / sum) * shp : 0.0f; }
  MOE_HD float chosen(int64_t j) const {
    const float v = value(j);
    return (pre || post) ? v * (h(j) - shp) : h(j) * elementwise_score_grad(c->score_function, logit(j), v);
  }
};

template <class Lanes, class In>
MOE_HD RouteRowGrad<In> route_row_grad(const Lanes& L, const RouteConfig& c, const typename In::storage* x,
                                       const int32_t* idx, const float* dw) {
  RouteRowGrad<In> r{&c, x, idx, dw, c.score_function == ScoreFunction::kSoftmax && c.use_pre_softmax,
                     c.softmax_post(), 0.0f, 1.0f, {1.0f, 0.0f}, 0.0f};
  const int64_t k = c.topk;
  if (r.pre) row_softmax_stats<Lanes, In>(L, x, c.num_experts, &r.mx, &r.sum);
  if (r.post) {
    float m = -INFINITY;
    for (int64_t j = L.lane; j < k; j += L.nlanes) m = fmaxf(m, r.logit(j));
    r.mx = L.max(m);
    float s = 0.0f;
    for (int64_t j = L.lane; j < k; j += L.nlanes) s += expf(r.logit(j) - r.mx);
    r.sum = L.sum(s);
  }
  float sv = 0.0f, sgv = 0.0f;
  for (int64_t j = L.lane; j < k; j += L.nlanes) {
    const float v = r.value(j);
    sv += v;
    sgv += c.scaling_factor * dw[j] * v;
  }
  r.rg = renorm_grad(c.renormalize, L.sum(sv), L.sum(sgv));
  float shp = 0.0f;
  if (r.pre || r.post)
    for (int64_t j = L.lane; j < k; j += L.nlanes) shp += r.h(j) * r.value(j);
  r.shp = L.sum(shp);
  return r;
}

// Backward of one row: d logits from d weights with the chosen set fixed (route_aux_bwd_of adds the
// aux loss's gradient). Writes every element of dx; indices outside [0, E) are skipped, never
// dereferenced.
template <class Lanes, class In>
MOE_HD void route_bwd_row(const Lanes& L, const RouteConfig& c, const typename In::storage* x,
                          const int32_t* idx, const float* dw, typename In::storage* dx) {
  const RouteRowGrad<In> r = route_row_grad<Lanes, In>(L, c, x, idx, dw);
  map_row<Lanes, In, In>(L, x, c.num_experts, dx, [&](int64_t, float xe) { return r.base(xe); });
  L.sync();  // the chosen experts' values below overwrite the base values above
  for (int64_t j = L.lane; j < c.topk; j += L.nlanes)
    if (r.chosen_valid(j)) dx[idx[j]] = In::from_float(r.chosen(j));
}

}  // namespace jax_moe
