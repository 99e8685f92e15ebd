// Row access written once for the CPU and CUDA kernels: a lane's share of a token row, read and written
// in 16-byte chunks where the row is aligned.
#pragma once

#include <cstdint>

#include "moe_math.h"

namespace jax_moe {

// A lane's share of a row [0, n): chunks of 16 bytes of the element type, chunk c going to lane
// c % nlanes, then the last n % (elements per chunk) elements one per lane. The assignment depends only
// on n, so per-lane sums are deterministic; a chunk is one 16-byte load (CUDA) where the row is aligned.
template <class S>
MOE_HD constexpr int chunk_elems() {
  return int(16 / sizeof(S));
}

MOE_HD bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <class S, int V>
MOE_HD void load_chunk(const S* p, bool aligned, S (&v)[V]) {
#ifdef __CUDA_ARCH__
  if (aligned) {
    struct alignas(16) Pack {
      S a[V];
    };
    const Pack pk = *reinterpret_cast<const Pack*>(p);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = pk.a[j];
    return;
  }
#endif
  for (int j = 0; j < V; ++j) v[j] = p[j];
}

template <class S, int V>
MOE_HD void store_chunk(S* p, bool aligned, const S (&v)[V]) {
#ifdef __CUDA_ARCH__
  if (aligned) {
    static_assert(V * sizeof(S) % 16 == 0, "whole 16-byte pieces");
#pragma unroll
    for (int i = 0; i < int(V * sizeof(S) / 16); ++i)
      reinterpret_cast<uint4*>(p)[i] = reinterpret_cast<const uint4*>(v)[i];
    return;
  }
#endif
  for (int j = 0; j < V; ++j) p[j] = v[j];
}

// Calls f(e0, xv) for this lane's pieces of the row, in its order: xv is a float array of the chunk's
// elements e0, e0 + 1, ... (of the chunk size, or of 1 for the last elements).
template <class Lanes, class In, class F>
MOE_HD void for_row(const Lanes& L, const typename In::storage* x, int64_t n, F f) {
  using S = typename In::storage;
  constexpr int V = chunk_elems<S>();
  const int64_t chunks = n / V;
  const bool aligned = aligned16(x);
  for (int64_t c = L.lane; c < chunks; c += L.nlanes) {
    S v[V];
    load_chunk(x + c * V, aligned, v);
    float xv[V];
#pragma unroll
    for (int j = 0; j < V; ++j) xv[j] = In::to_float(v[j]);
    f(c * V, xv);
  }
  for (int64_t e = chunks * V + L.lane; e < n; e += L.nlanes) {
    const float xv[1] = {In::to_float(x[e])};
    f(e, xv);
  }
}

// A walk of a row is a callable: walk(fn) calls fn(e0, xv) for this lane's pieces in for_row's order,
// read from memory (row_walk) or from a copy of the row (the CUDA logits backward), so an algorithm
// written over a walk runs on either. Algorithms take walks by reference: a copy in registers is one.
template <class Lanes, class In>
MOE_HD auto row_walk(const Lanes& L, const typename In::storage* x, int64_t n) {
  return [=](auto fn) { for_row<Lanes, In>(L, x, n, fn); };
}

// w[j] = v(e0 + j) for a chunk of per-expert weights; types with a faster way to read a chunk
// overload it (Counts: 16-byte loads).
template <int N, class V>
MOE_HD void weights_at(const V& v, int64_t e0, float (&w)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) w[j] = v(e0 + j);
}

// Writes piece y of for_row's pieces (a whole chunk, or one element) to out[e0, e0 + N) as Out, with
// 16-byte stores where `aligned`.
template <class Out, int N>
MOE_HD void store_piece(typename Out::storage* out, bool aligned, int64_t e0, const float (&y)[N]) {
  using O = typename Out::storage;
  alignas(16) O o[N];
#pragma unroll
  for (int j = 0; j < N; ++j) o[j] = Out::from_float(y[j]);
  if constexpr (N == 1) {
    out[e0] = o[0];
  } else {
    store_chunk(out + e0, aligned, o);
  }
}

// out[e0 + j] = Out::from_float(y[j]) where f(e0, xv, y) fills y from each piece xv of the walk, with
// 16-byte stores where out is aligned: checked here unless the caller knows it (known_aligned), which
// spares the kernels the check and the element-wise stores.
template <class Out, class Walk, class F>
MOE_HD void map_pieces(const Walk& walk, typename Out::storage* out, bool known_aligned, F f) {
  const bool out_aligned = known_aligned || aligned16(out);
  walk([&](int64_t e0, const auto& xv) {
    constexpr int N = int(sizeof(xv) / sizeof(float));
    float y[N];
    f(e0, xv, y);
    store_piece<Out>(out, out_aligned, e0, y);
  });
}

// out[e] = Out::from_float(f(e, x_e)) for the elements this lane owns (the same share as for_row).
template <class Lanes, class In, class Out, class F>
MOE_HD void map_row(const Lanes& L, const typename In::storage* x, int64_t n, typename Out::storage* out, F f) {
  map_pieces<Out>(row_walk<Lanes, In>(L, x, n), out, false, [&](int64_t e0, const auto& xv, auto& y) {
#pragma unroll
    for (int j = 0; j < int(sizeof(xv) / sizeof(float)); ++j) y[j] = f(e0 + j, xv[j]);
  });
}

// map_pieces with per-expert weights read a piece at a time: f(xv, w, y) fills y from the piece xv and
// its weights w[j] = v(e0 + j).
template <class Out, class Walk, class V, class F>
MOE_HD void map_pieces_weighted(const Walk& walk, typename Out::storage* out, bool known_aligned, const V& v, F f) {
  map_pieces<Out>(walk, out, known_aligned, [&](int64_t e0, const auto& xv, auto& y) {
    constexpr int N = int(sizeof(xv) / sizeof(float));
    float w[N];
    weights_at(v, e0, w);
    f(xv, w, y);
  });
}

}  // namespace jax_moe
