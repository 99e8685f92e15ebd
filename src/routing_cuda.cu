// CUDA handlers of the routing primitives, plain and fused with the aux loss statistics.
//
// Forward: one launch, nothing [T, E] written. Three paths:
//  * thread per token for E <= 32 without groups (a whole row in one thread's registers);
//  * a segment of 8 (E <= 256, many tokens) or 32 lanes per token for E <= 1024, topk <= 32 and
//    groups that are runs of whole lanes (DeepSeek-V3: 8 lanes of 32 experts, one group each); a
//    warp routes 32 / S tokens at once, every lane holding V experts in registers;
//  * otherwise the shared row algorithm of routing_row.h, a warp per token on shared memory.
// DeepSeek-V3's exact config and Qwen3-MoE's router shape have segment kernels of their own, compiled with
// them as constants (kDeepSeekV3Config, kSoftmax128Top8Config); DeepSeek-V3's 16-bit rows at 8 lanes a token
// have a lean kernel besides (route_deepseek_v3_kernel), which takes the segment code only for the rows it refuses.
// aux_loss_scores' forward also takes the segment path where that is faster (segment_scores_cuda.h).
// The fused aux variant also accumulates clean-score column sums and top-k counts per block into a
// workspace [blocks, E], which a second small kernel adds up in block order: deterministic. DeepSeek-V3's 16-bit
// rows take route_deepseek_v3_aux_kernel instead, which totals them itself (64-bit fixed point) and forms the loss.
// Backward: the shared backward row algorithm, run by 1, 8 or 32 lanes a token (dispatch_bwd_lanes);
// the fused aux backward for E <= 256 keeps each row in registers between its two walks (DeepSeek-V3's 16-bit
// rows: route_aux_bwd_deepseek_v3_kernel).
#include <cuda/atomic>
#include <cuda_runtime.h>

#include <climits>
#include <string>
#include <type_traits>

#include "cuda_launch.h"
#include "ffi_helpers.h"
#include "handlers.h"
#include "lanes_cuda.cuh"
#include "route_aux_row.h"
#include "segment_scores_cuda.h"

namespace jax_moe {
namespace {

constexpr int kWarpsPerBlock = 8;

// Where the fused aux variant of a forward kernel leaves its per-block partial statistics.
struct AuxArgs {
  AuxConfig cfg;
  float* ws_colsum;    // [gridDim.x, E]
  int32_t* ws_counts;  // [gridDim.x, E]
};

// ---------------------------------------------------------------- segment path
// A segment of S lanes routes one token, so a warp routes 32 / S tokens at once; lane l of a
// segment holds experts [l*V, l*V + V) in registers. Segments past the last token route a copy of
// it and write nothing, so that every lane takes part in every shuffle. Per token:
//  1. ranking keys in registers, and in shared memory for step 4;
//  2. groups (runs of lpg lanes) keep their experts only if among the group_topk best;
//  3. tau, a key that at least k keys reach, and usually few more: the smallest second-best key
//     of the kept groups where those suffice (DeepSeek-V3), else the k-th largest of the
//     segment's kChunks * S chunk maxima;
//  4. the keys >= tau (at most 32, else the exact fallback) are sorted (at most 2S: two a lane) or
//     ranked against each other.
// That is O(V) work per lane and O(k log S) shuffles per token, where k rounds of arg-max over the
// row would take O(k V).
constexpr int kChunks = 4;    // chunk maxima per lane
constexpr int kMaxSegmentTopk = 32;

// Which experts lane sl of a segment holds, value i of its V: a run of V (kRun, which groups need: they
// are runs of lanes), or every S-th piece of 4 experts (kInterleaved: a segment's loads and stores of a
// row then cover contiguous bytes, where a run makes each 16-byte access of a warp touch another line).
enum class Spread { kRun, kInterleaved };

template <Spread P, int S, int V>
__device__ int expert_at(int sl, unsigned i) {  // unsigned: i / 4 and i % 4 are shifts and masks
  if constexpr (P == Spread::kRun) return sl * V + int(i);
  else return int((i / 4 * S + sl) * 4 + i % 4);
}

// A candidate of segment_topk as one 64-bit number that is larger where the candidate ranks first:
// the key above the complement of the expert (the lower expert wins a tie).
__device__ uint64_t packed_cand(uint32_t key, int expert) { return (uint64_t(key) << 32) | uint32_t(~expert); }
__device__ int packed_expert(uint64_t c) { return int(~uint32_t(c)); }

// The selection ranks keys (rank_key: any value, excluded slots) or, for rows without NaN, -0.0 or
// padding, the float values themselves: the same order, without a key per element (only the candidates
// take keys, to be sorted). Elem is uint32_t (a key) or float.
__device__ uint32_t elem_max(uint32_t a, uint32_t b) { return max(a, b); }
__device__ uint32_t elem_min(uint32_t a, uint32_t b) { return min(a, b); }
__device__ float elem_max(float a, float b) { return fmaxf(a, b); }
__device__ float elem_min(float a, float b) { return fminf(a, b); }
__device__ float elem_value(uint32_t key) { return key_value(key); }
__device__ float elem_value(float v) { return v; }
__device__ uint32_t elem_bits(uint32_t key) { return key; }
__device__ uint32_t elem_bits(float v) { return __float_as_uint(v); }
__device__ uint32_t elem_key(uint32_t key) { return key; }
__device__ uint32_t elem_key(float v) { return rank_key_no_neg_zero(v); }
template <class Elem>
__device__ Elem elem_lowest() {
  if constexpr (std::is_same_v<Elem, float>) return -INFINITY;
  else return kExcluded;
}

// Candidate rows hold kMaxSegmentTopk candidates, then zeros (which rank after every candidate) up to a
// multiple of 4, read 4 at a time; 36 entries put the segments' rows on different banks.
constexpr int kCandRow = kMaxSegmentTopk + 4;

// Per-warp shared memory of the segment path. Element i of warp lane l lives at [i / 4][l][i % 4]:
// the 16-byte accesses of a warp's lanes are then contiguous, free of bank conflicts. The aux variant
// passes each token's clean scores between the warp's segments where the keys are (score). The rows
// of cand and pick are padded so that the segments' rows start on different banks.
template <int S, int V>
struct SegmentScratch {
  union {
    uint4 key[V / 4][32];
    float4 score[V / 4][32];
  };
  alignas(16) uint64_t cand[32 / S][kCandRow];
  int32_t pick[32 / S][kMaxSegmentTopk + 1];  // expert of rank j

  __device__ uint32_t key_at(int lane, unsigned i) const {  // unsigned: see expert_at
    return reinterpret_cast<const uint32_t*>(&key[i / 4][lane])[i % 4];
  }
  __device__ float score_at(int lane, int i) const {
    return reinterpret_cast<const float*>(&score[i / 4][lane])[i % 4];
  }
};

// The aux variant's clean-score column sums of a warp, in shared memory: in registers (V a lane) they
// would halve the kernel's occupancy. Lane sl of every segment holds experts [sl*V, sl*V + V); segment q
// adds up part q of them, kOwned a lane, at sums[j][lane].
template <int S, int V>
struct WarpColumnSums {
  static constexpr int kOwned = V * S / 32;
  float sums[kOwned][32];

  __device__ float of_expert(int e) const {
    const int sl = e / V, q = e % V / kOwned;
    return sums[e % kOwned][q * S + sl];
  }
};

// Where the bias of expert e = l * V + i (segment lane l) lives in shared memory: [i / 4][l][i % 4],
// so that the segment's lanes read 16 contiguous bytes each.
template <int S, int V>
__device__ int bias_slot(int e) {
  const int l = e / V, i = e % V;
  return ((i / 4) * S + l) * 4 + i % 4;
}

// What a token's selection ranks before adding the bias: the logit (softmax after top-k), or a score.
enum class Carry { kLogit, kSigmoid, kSqrtSoftplus, kSoftmax };

__device__ Carry score_carry(ScoreFunction f) {
  return f == ScoreFunction::kSoftmax ? Carry::kSoftmax
         : f == ScoreFunction::kSigmoid ? Carry::kSigmoid
                                        : Carry::kSqrtSoftplus;
}

__device__ Carry route_carry(const RouteConfig& c) {
  return c.softmax_post() ? Carry::kLogit : score_carry(c.score_function);
}

// The carried value of logit x; softmax needs the row maximum and 1 / Σ exp(x - max).
template <Carry K>
__device__ float carried(float x, float mx, float inv_sum) {
  if constexpr (K == Carry::kLogit) return x;
  else if constexpr (K == Carry::kSigmoid) return sigmoid(x);
  else if constexpr (K == Carry::kSqrtSoftplus) return sqrtf(softplus(x));
  else return expf(x - mx) * inv_sum;
}

// Calls f.template operator()<K>() for the runtime k: one branch per token, none per expert.
template <class F>
__device__ void with_carry(Carry k, F&& f) {
  switch (k) {
    case Carry::kLogit: f.template operator()<Carry::kLogit>(); break;
    case Carry::kSigmoid: f.template operator()<Carry::kSigmoid>(); break;
    case Carry::kSqrtSoftplus: f.template operator()<Carry::kSqrtSoftplus>(); break;
    default: f.template operator()<Carry::kSoftmax>(); break;
  }
}

template <int V>
__device__ void carried_row(Carry k, const float (&x)[V], float mx, float inv_sum, float (&out)[V]) {
  with_carry(k, [&]<Carry K>() {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = carried<K>(x[i], mx, inv_sum);
  });
}

// This lane's V logits (Spread::kRun) of a row of exactly S * V experts, as stored, in 16-byte loads.
// load_segment_row converts them at once; the DeepSeek-V3 kernel at small T loads them before other work
// and converts them after it, so that the load's latency overlaps that work.
template <class In, int S, int V>
struct StoredRow {
  using St = typename In::storage;
  alignas(16) St v[V];

  __device__ void load(const SegmentLanes<S>& g, const St* row) {
#pragma unroll
    for (int c = 0; c < V * int(sizeof(St)) / 16; ++c)
      reinterpret_cast<uint4*>(v)[c] = __ldg(reinterpret_cast<const uint4*>(row + g.sl * V) + c);
  }

  __device__ void to_floats(float (&x)[V]) const {
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] = In::to_float(v[i]);
  }
};

// This lane's V logits as float, -inf past the row's end (which every score maps to 0).
template <class In, int S, int V, Spread P = Spread::kRun>
__device__ void load_segment_row(const SegmentLanes<S>& g, const typename In::storage* row, int E, float (&x)[V]) {
  using St = typename In::storage;
  if constexpr (P == Spread::kInterleaved) {
    if (E == S * V) {  // then every piece of 4 experts is aligned to its size
      struct alignas(4 * sizeof(St)) Piece {
        St v[4];
      };
#pragma unroll
      for (int c = 0; c < V / 4; ++c) {
        const Piece p = *reinterpret_cast<const Piece*>(row + expert_at<P, S, V>(g.sl, 4 * c));
#pragma unroll
        for (int j = 0; j < 4; ++j) x[4 * c + j] = In::to_float(p.v[j]);
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int e = expert_at<P, S, V>(g.sl, i);
      x[i] = e < E ? In::to_float(row[e]) : -INFINITY;
    }
    return;
  }
  if constexpr (V * sizeof(St) % 16 == 0) {
    if (E == S * V) {  // then every row starts 16-byte aligned
      StoredRow<In, S, V> stored;
      stored.load(g, row);
      stored.to_floats(x);
      return;
    }
  }
  const int e0 = g.sl * V;
#pragma unroll
  for (int i = 0; i < V; ++i) x[i] = e0 + i < E ? In::to_float(row[e0 + i]) : -INFINITY;
}

// Keys made by rank_key_unless_nan are exact unless some lane of the warp saw a NaN: testing each value costs
// one instruction where rank_key's test costs two, and the repair runs only for warps with a NaN row.
template <int V>
__device__ void repair_nan_keys(bool nan, uint32_t (&key)[V]) {
  if (!__any_sync(kFullMask, nan)) return;
#pragma unroll
  for (int i = 0; i < V; ++i) key[i] = repair_nan_key(key[i]);
}

template <int S, int V, Spread P = Spread::kRun>
__device__ void exclude_padding(const SegmentLanes<S>& g, int E, uint32_t (&key)[V]) {
  if (E == S * V) return;
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (expert_at<P, S, V>(g.sl, i) >= E) key[i] = kExcluded;
}

__device__ void sort4_descending(uint32_t (&a)[4]) {
  const auto order = [&](int i, int j) {
    const uint32_t hi = max(a[i], a[j]), lo = min(a[i], a[j]);
    a[i] = hi;
    a[j] = lo;
  };
  order(0, 1), order(2, 3), order(0, 2), order(1, 3), order(1, 2);
}

// The k-th largest of the segment's chunk maxima, at least 1 (excluded keys never qualify).
template <int S, int V>
__device__ uint32_t candidate_threshold(const SegmentLanes<S>& g, int k, const uint32_t (&key)[V], bool alive) {
  constexpr int Q = V / kChunks;
  uint32_t head[kChunks];  // this lane's chunk maxima, largest first; taken ones shift out
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    uint32_t m = kExcluded;
#pragma unroll
    for (int q = 0; q < Q; ++q) m = max(m, key[c * Q + q]);
    head[c] = alive ? m : kExcluded;
  }
  sort4_descending(head);
  uint32_t tau = kExcluded;
  for (int r = 0; r < k; ++r) {
    tau = g.max(head[0]);
    if (g.sl == g.first(head[0] == tau)) head[0] = head[1], head[1] = head[2], head[2] = head[3], head[3] = kExcluded;
  }
  return max(tau, kExcluded + 1);
}

// k rounds of segment arg-max: exact whatever the ties, for warps where some token has more than
// kMaxSegmentTopk candidates.
template <int S, int V, Spread P>
__device__ void topk_by_rounds(const SegmentLanes<S>& g, int k, const uint32_t (&key)[V], bool alive, int32_t* pick) {
  __syncwarp();  // pick may still be read for the previous token
  Cand bound = start_bound();
  for (int j = 0; j < k; ++j) {
    Cand best = no_cand();
    if (alive)
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const Cand c{key[i], expert_at<P, S, V>(g.sl, i)};
        if (c.key != kExcluded && before(bound, c) && before(c, best)) best = c;
      }
    bound = g.best(best);
    if (g.sl == 0) pick[j] = bound.idx;
  }
  __syncwarp();
}

// Writes the experts of a segment's k best candidates, in rank order, to pick, where it has at most
// 2S of them: a bitonic sort (descending) of cand[0, 2S), zeros past total (they sort last), holding
// elements sl and S + sl in lane sl. With 8 lanes a segment that beats counting each candidate's rank,
// which costs a lane two or more passes over the candidates.
template <int S>
__device__ void sort_candidates(const SegmentLanes<S>& g, int total, int k, const uint64_t* cand, int32_t* pick) {
  uint64_t v[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) v[r] = r * S + g.sl < total ? cand[r * S + g.sl] : 0;
#pragma unroll
  for (int size = 2; size <= 2 * S; size <<= 1)
#pragma unroll
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      if (stride == S) {  // partners in one lane, in the final, descending block
        const uint64_t hi = max(v[0], v[1]), lo = min(v[0], v[1]);
        v[0] = hi, v[1] = lo;
        continue;
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        // The last merge's lower half is never picked where k <= S: 3 of 18 shuffle rounds of 64-bit values
        // saved (DeepSeek-V3 T = 16384 10.53-10.58 -> 10.40-10.46 us, H100).
        if (size == 2 * S && r == 1 && k <= S) continue;
        const int i = r * S + g.sl;
        const uint64_t other = __shfl_xor_sync(kFullMask, v[r], stride);
        const bool keep_max = ((i & stride) == 0) == ((i & size) == 0);  // lower element of a descending block
        if ((other > v[r]) == keep_max) v[r] = other;
      }
    }
#pragma unroll
  for (int r = 0; r < 2; ++r)
    if (r * S + g.sl < k) pick[r * S + g.sl] = packed_expert(v[r]);
}

// Writes the experts of the segment's k best elements (keys or floats, see elem_key), in rank order, to
// s.pick[segment][0, k), given tau <= the k-th best. alive = false: this lane's elements do not take part
// (its group was dropped).
template <int S, int V, Spread P = Spread::kRun, class Elem>
__device__ void segment_topk(const SegmentLanes<S>& g, int k, const Elem (&val)[V], bool alive, Elem tau,
                             SegmentScratch<S, V>& s) {
  const int seg = g.segment();
#pragma unroll
  for (int c = 0; c < V / 4; ++c)  // read back by index below
    s.key[c][g.lane] = make_uint4(elem_bits(val[4 * c]), elem_bits(val[4 * c + 1]), elem_bits(val[4 * c + 2]),
                                  elem_bits(val[4 * c + 3]));
  uint32_t mask = 0;
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (alive && val[i] >= tau) mask |= 1u << i;
  const int count = __popc(mask);
  int first, total;
  if constexpr (S == 32 && V < 16) {
    first = g.template exclusive_sum_by_ballots<V>(count, total);
  } else {
    first = g.exclusive_sum(count);
    total = g.shfl(first + count, S - 1);
  }
  if (__any_sync(kFullMask, total > kMaxSegmentTopk)) {
    uint32_t key[V];
#pragma unroll
    for (int i = 0; i < V; ++i) key[i] = elem_key(val[i]);
    return topk_by_rounds<S, V, P>(g, k, key, alive, s.pick[seg]);
  }

  uint64_t* cand = s.cand[seg];
  for (int slot = first; mask; mask &= mask - 1, ++slot) {
    const unsigned i = __ffs(mask) - 1;
    const uint32_t bits = s.key_at(g.lane, i);
    const uint32_t key = std::is_same_v<Elem, float> ? elem_key(__uint_as_float(bits)) : bits;
    cand[slot] = packed_cand(key, expert_at<P, S, V>(g.sl, i));
  }
  const int padded = (total + 3) & ~3;
  if (total + g.sl < padded) cand[total + g.sl] = 0;
  __syncwarp();
  if constexpr (S < 32) {
    if (!__any_sync(kFullMask, total > 2 * S)) {
      sort_candidates<S>(g, total, k, cand, s.pick[seg]);
      __syncwarp();
      return;
    }
  }
  for (int q = g.sl; q < total; q += S) {  // rank = how many candidates rank before this one
    const uint64_t c = cand[q];
    int rank = 0;
    for (int o = 0; o < padded; o += 4) {
      const ulonglong2 a = *reinterpret_cast<const ulonglong2*>(cand + o);
      const ulonglong2 b = *reinterpret_cast<const ulonglong2*>(cand + o + 2);
      rank += int(a.x > c) + int(a.y > c) + int(b.x > c) + int(b.y > c);
    }
    if (rank < k) s.pick[seg][rank] = packed_expert(c);
  }
  __syncwarp();
}

template <class Elem>
struct GroupChoice {
  bool kept;    // among the group_topk best
  Elem second;  // the group's second-best element
};

// Group selection (SPEC §1 step 3) for this lane's group. Groups are runs of lpg lanes, scored by
// the sum of their group_score_topn (1 or 2) best elements' values.
template <int S, int V, class Elem>
__device__ GroupChoice<Elem> choose_group(const SegmentLanes<S>& g, const RouteConfig& c, int lpg,
                                          const Elem (&val)[V]) {
  Elem t1 = elem_lowest<Elem>(), t2 = t1;  // this lane's two best
#pragma unroll
  for (int i = 0; i < V; ++i) t2 = elem_max(t2, elem_min(t1, val[i])), t1 = elem_max(t1, val[i]);
  for (int off = 1; off < lpg; off <<= 1) {  // merge the group's lanes
    const Elem o1 = __shfl_xor_sync(kFullMask, t1, off), o2 = __shfl_xor_sync(kFullMask, t2, off);
    t2 = elem_max(elem_min(t1, o1), elem_max(t2, o2));
    t1 = elem_max(t1, o1);
  }
  const float total = c.group_score_topn == 1 ? elem_value(t1) : elem_value(t1) + elem_value(t2);
  const uint32_t mine = rank_key(total);
  const int shift = __ffs(lpg) - 1;  // lpg divides S, a power of two: shifts, where / took ~36 instructions
  const int groups = S >> shift, group = g.sl >> shift;
  int rank = 0;
#pragma unroll
  for (int o = 1; o < S; ++o) {  // unrolled up to the largest group count; groups is warp-uniform
    if (o >= groups) break;
    const int other = (group + o) & (groups - 1);
    rank += ranks_before(g.shfl(mine, other << shift), other, mine, group);
  }
  return {rank < c.group_topk, t2};
}

// Where 2 * group_topk >= k, the smallest second best of the kept groups is a threshold for
// segment_topk (every kept group has two elements that reach its second best): one reduction, where
// the chunk maxima take k. Groups of 2 or more, tested without a division.
__device__ bool second_best_threshold(const RouteConfig& c, int lpg) {
  return lpg && 2 * c.group_topk >= c.topk && c.num_experts >= 2 * c.num_groups;
}

template <int S, int V>
__device__ uint32_t route_threshold(const SegmentLanes<S>& g, const RouteConfig& c, int lpg,
                                    const uint32_t (&key)[V], GroupChoice<uint32_t> group) {
  if (second_best_threshold(c, lpg)) return max(g.min(group.kept ? group.second : 0xffffffffu), kExcluded + 1);
  return candidate_threshold<S, V>(g, int(c.topk), key, group.kept);
}

// Adds one token's clean scores num[i] * scale (scale 0 for a segment past the last token) to the warp's
// column sums; the segments first add up their scores of each part through shared memory, in segment
// order.
template <int S, int V>
__device__ void add_column_sums(const SegmentLanes<S>& g, const float (&num)[V], float scale,
                                SegmentScratch<S, V>& s, WarpColumnSums<S, V>& cs) {
  constexpr int kSegments = 32 / S, kOwned = WarpColumnSums<S, V>::kOwned;
  if constexpr (kSegments == 1) {
#pragma unroll
    for (int i = 0; i < V; ++i) cs.sums[i][g.lane] += num[i] * scale;
  } else {
    __syncwarp();  // the previous token's keys may still be read
#pragma unroll
    for (int c4 = 0; c4 < V / 4; ++c4)
      s.score[c4][g.lane] = make_float4(num[4 * c4] * scale, num[4 * c4 + 1] * scale, num[4 * c4 + 2] * scale,
                                        num[4 * c4 + 3] * scale);
    __syncwarp();
#pragma unroll
    for (int j = 0; j < kOwned; ++j) {
      float part = 0.0f;
#pragma unroll
      for (int q = 0; q < kSegments; ++q) part += s.score_at(q * S + g.sl, g.segment() * kOwned + j);
      cs.sums[j][g.lane] += part;
    }
    __syncwarp();  // the keys go there next
  }
}

// The clean scores (SPEC §2) of the token row a segment holds are num[i] · inv_denom: fills num and
// returns inv_denom.
template <int S, int V>
__device__ float segment_clean_scores(const SegmentLanes<S>& g, Carry k, const float (&x)[V], float (&num)[V]) {
  float mx = 0.0f;
  if (k == Carry::kSoftmax) {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < V; ++i) m = fmaxf(m, x[i]);
    mx = g.fmax(m);
  }
  float total = 0.0f;
  carried_row<V>(k, x, mx, 1.0f, num);
#pragma unroll
  for (int i = 0; i < V; ++i) total += num[i];
  return 1.0f / (k == Carry::kSoftmax ? g.sum(total) : g.sum(total) + kEps);  // as CleanStats
}

// Adds the token's top-k experts by clean score to counts (shared or global memory; integer atomics, so
// the order does not matter), where the token is valid.
template <int S, int V, Spread P>
__device__ void count_clean_topk(const SegmentLanes<S>& g, int k, const float (&num)[V], float inv_denom, int E,
                                 bool valid, SegmentScratch<S, V>& s, int* counts) {
  uint32_t key[V];
  bool nan = false;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const float score = num[i] * inv_denom;  // never -0.0: num >= +0.0 and inv_denom > 0, unless NaN
    nan |= score != score;
    key[i] = rank_key_unless_nan(score);
  }
  repair_nan_keys<V>(nan, key);
  exclude_padding<S, V, P>(g, E, key);
  segment_topk<S, V, P>(g, k, key, true, candidate_threshold<S, V>(g, k, key, true), s);
  if (valid)
    for (int j = g.sl; j < k; j += S) atomicAdd(&counts[s.pick[g.segment()][j]], 1);
  __syncwarp();  // pick is written again for the next selection
}

// Fused aux statistics of one token: clean scores into the warp's column sums, its top-k experts by
// clean score into the block's histogram.
template <int S, int V>
__device__ void aux_token_segment(const SegmentLanes<S>& g, const AuxConfig& a, const float (&x)[V], int E,
                                  bool valid, SegmentScratch<S, V>& s, WarpColumnSums<S, V>& cs, int* counts) {
  float num[V];
  const float inv_denom = segment_clean_scores<S, V>(g, score_carry(a.score_function), x, num);
  add_column_sums<S, V>(g, num, valid ? inv_denom : 0.0f, s, cs);
  count_clean_topk<S, V, Spread::kRun>(g, int(a.topk), num, inv_denom, E, valid, s, counts);
}

// Weights of the chosen experts from their logits, written by the segment's lanes in rank order.
template <class In, int S, int P>
__device__ void write_routing_picks(const SegmentLanes<S>& g, const RouteConfig& c, Carry k,
                                    const typename In::storage* row, float mx, float inv_sum, const int32_t* pick,
                                    bool valid, float* w_out, int32_t* idx_out) {
  const int topk = int(c.topk);
  int e[P];
  float v[P];
  with_carry(k, [&]<Carry K>() {  // around the picks: per pick, the compiler computed every carry, predicated
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int j = g.sl + p * S;
      e[p] = j < topk ? pick[j] : 0;
      v[p] = j < topk ? carried<K>(In::to_float(row[e[p]]), mx, inv_sum) : 0.0f;
    }
  });
  float w[P], total = 0.0f;
  if (c.softmax_post()) {
    float m = -INFINITY;
#pragma unroll
    for (int p = 0; p < P; ++p)
      if (g.sl + p * S < topk) m = fmaxf(m, v[p]);
    m = g.fmax(m);
#pragma unroll
    for (int p = 0; p < P; ++p) total += (w[p] = g.sl + p * S < topk ? expf(v[p] - m) : 0.0f);
    total = g.sum(total);
  } else {
#pragma unroll
    for (int p = 0; p < P; ++p) total += (w[p] = v[p]);
    total = c.renormalize ? g.sum(total) + kEps : 1.0f;
  }
  if (!valid) return;
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int j = g.sl + p * S;
    if (j < topk) w_out[j] = w[p] / total * c.scaling_factor, idx_out[j] = e[p];
  }
}

// P picks a lane cover k <= P * S; the unrolled work of picks past k is predicated off but still issued,
// so k <= S (DeepSeek-V3 with 8 lanes a token) takes its own one-pick code: T = 16384 bf16 11.46 -> 11.25
// us. Not for float32 rows, whose kernels then spill (none without it).
template <class In, int S>
__device__ void write_routing(const SegmentLanes<S>& g, const RouteConfig& c, Carry k,
                              const typename In::storage* row, float mx, float inv_sum, const int32_t* pick,
                              bool valid, float* w_out, int32_t* idx_out) {
  if (S < kMaxSegmentTopk && sizeof(typename In::storage) == 2 && c.topk <= S)
    return write_routing_picks<In, S, 1>(g, c, k, row, mx, inv_sum, pick, valid, w_out, idx_out);
  write_routing_picks<In, S, kMaxSegmentTopk / S>(g, c, k, row, mx, inv_sum, pick, valid, w_out, idx_out);
}

// DeepSeek-V3's router (noaux_tc): 256 experts in 8 groups of 32, the 4 best groups by the sum of their
// top 2, the top 8 of the sigmoid scores plus bias, renormalised; route_with_aux_loss's statistics by
// default count the top 8 of the clean sigmoid scores. The segment kernels have an instantiation for
// exactly this config, which folds it in as constants: the branches of other configs go, and so do the
// registers that held the config. Only the scaling factor stays a runtime value. The bf16 kernels shrank
// from 9568 to 4792 instructions (8 lanes a token) and 3128 to 1088 (a warp a token), and on one H200
// (RESULTS.md, session 13) T = 64 took 2.94 -> 2.34 us, T = 16384 10.8 -> 10.1, T = 65536 34.3 -> 31.4,
// route_with_aux_loss T = 16384 27.0 -> 24.3.
constexpr RouteConfig kDeepSeekV3Config{256, 8, ScoreFunction::kSigmoid, false, 8, 4, 2, true, 1.0f};
constexpr AuxConfig kDeepSeekV3AuxConfig{8, ScoreFunction::kSigmoid};

// The router of Qwen2-MoE and Qwen3-MoE (128 experts): a softmax, the top 8. Compiled as the default
// post-softmax (the top 8 logits, then a softmax over them), which gives the weights of the models' own form
// (the softmax over all experts, its top 8 renormalised); aux statistics: the top 8 of the softmax.
constexpr RouteConfig kSoftmax128Top8Config{128, 8, ScoreFunction::kSoftmax, false, 0, 0, 0, false, 1.0f};
constexpr AuxConfig kSoftmax128Top8AuxConfig{8, ScoreFunction::kSoftmax};

// Which config a kernel has compiled in (kNone: the config is a run-time value), and the configs by it.
enum class Fixed { kNone, kDeepSeekV3, kSoftmax128Top8 };
constexpr Fixed kFixedConfigs[] = {Fixed::kDeepSeekV3, Fixed::kSoftmax128Top8};
constexpr RouteConfig kFixedRoute[] = {RouteConfig{}, kDeepSeekV3Config, kSoftmax128Top8Config};
constexpr AuxConfig kFixedAux[] = {AuxConfig{}, kDeepSeekV3AuxConfig, kSoftmax128Top8AuxConfig};

// c, or the config compiled in (c must then be that config, as fixed_config checks), with c's scaling factor.
template <Fixed kFixed>
__device__ RouteConfig kernel_config(const RouteConfig& c) {
  if constexpr (kFixed == Fixed::kNone) {
    return c;
  } else {
    constexpr RouteConfig kConfig = kFixedRoute[int(kFixed)];
    RouteConfig fixed = kConfig;
    fixed.scaling_factor = c.scaling_factor;
    return fixed;
  }
}

template <Fixed kFixed>
__device__ AuxConfig kernel_aux_config(const AuxConfig& a) {
  if constexpr (kFixed == Fixed::kNone) {
    return a;
  } else {
    constexpr AuxConfig kConfig = kFixedAux[int(kFixed)];
    return kConfig;
  }
}

// The selection of a grouped row on its float values (elem_key), keys made for the candidates only: for
// DeepSeek-V3 bf16 at many tokens (8 lanes a token) T = 16384 11.87 -> 11.2 us, T = 65536 38.8 -> 34.3.
// Returns false, having done nothing, where it does not apply: rows with padding or a NaN (a NaN key ranks
// below -inf, which no float does), thresholds other than the second best, and kernels where the path's
// code costs more than it saves. The aux variant of a runtime config and float32 rows then spill (the aux
// kernel 23.1 -> 23.8 us at T = 16384; f32 T = 65536 43.4 -> 45.0); the DeepSeek-V3 aux kernel spills less
// with it (16 bytes of stores against 60, bf16). A whole warp a token runs a single token's chain at small
// T, where the added code was slower (T = 64 3.15 -> 3.23 us, softmax E = 128 2.88 -> 2.98).
template <class In, int S, int V, bool kAux, Fixed kFixed>
__device__ bool select_on_floats(const SegmentLanes<S>& g, const RouteConfig& c, int lpg, int E,
                                 const float (&sel)[V], SegmentScratch<S, V>& s) {
  if constexpr ((kAux && kFixed != Fixed::kDeepSeekV3) || S == 32 || sizeof(typename In::storage) != 2) {
    return false;
  } else {
    if (E != S * V || !second_best_threshold(c, lpg)) return false;
    bool nan = false;
#pragma unroll
    for (int i = 0; i < V; ++i) nan |= sel[i] != sel[i];  // two values an instruction (FSETP.NAN.OR)
    if (__any_sync(kFullMask, nan)) return false;
    const GroupChoice<float> group = choose_group<S, V>(g, c, lpg, sel);
    const uint32_t least_second = g.min(group.kept ? rank_key_no_neg_zero(group.second) : 0xffffffffu);
    segment_topk<S, V>(g, int(c.topk), sel, group.kept, key_value(least_second), s);
    return true;
  }
}

template <class In, int S, int V, bool kAux, Fixed kFixed>
__device__ void route_token_segment(const SegmentLanes<S>& g, const RouteConfig& c, const AuxConfig& a, int lpg,
                                    float (&x)[V], const typename In::storage* row, bool valid, const float4* bias,
                                    SegmentScratch<S, V>& s, WarpColumnSums<S, V>* cs, int* counts, float* w_out,
                                    int32_t* idx_out) {
  const int E = int(c.num_experts);
  if constexpr (kAux) {
    aux_token_segment<S, V>(g, a, x, E, valid, s, *cs, counts);
    // Loaded again (from cache) rather than kept in registers through the aux selection.
    load_segment_row<In, S, V>(g, row, E, x);
  }

  const Carry k = route_carry(c);
  float mx = 0.0f, inv_sum = 1.0f;
  if (k == Carry::kSoftmax) {
    float m = -INFINITY, sum = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i) m = fmaxf(m, x[i]);
    mx = g.fmax(m);
#pragma unroll
    for (int i = 0; i < V; ++i) sum += expf(x[i] - mx);
    inv_sum = 1.0f / g.sum(sum);
  }
  float val[V];
  carried_row<V>(k, x, mx, inv_sum, val);
  float sel[V];  // what the selection ranks; the bias is never -0.0, so neither is a sum
#pragma unroll
  for (int c4 = 0; c4 < V / 4; ++c4) {
    const float4 b = bias[c4 * S];
    sel[4 * c4] = val[4 * c4] + b.x, sel[4 * c4 + 1] = val[4 * c4 + 1] + b.y;
    sel[4 * c4 + 2] = val[4 * c4 + 2] + b.z, sel[4 * c4 + 3] = val[4 * c4 + 3] + b.w;
  }
  if (!select_on_floats<In, S, V, kAux, kFixed>(g, c, lpg, E, sel, s)) {
    uint32_t key[V];
#pragma unroll
    for (int i = 0; i < V; ++i) key[i] = rank_key_no_neg_zero(sel[i]);
    exclude_padding<S, V>(g, E, key);
    const GroupChoice<uint32_t> group =
        lpg ? choose_group<S, V>(g, c, lpg, key) : GroupChoice<uint32_t>{true, kExcluded};
    segment_topk<S, V>(g, int(c.topk), key, group.kept, route_threshold<S, V>(g, c, lpg, key, group), s);
  }
  write_routing<In, S>(g, c, k, row, mx, inv_sum, s.pick[g.segment()], valid, w_out, idx_out);
}

// Dynamic shared memory: the bias [S*V] (0 past E; see bias_slot), for the aux variant the block's
// top-k counts [S*V], then one SegmentScratch per warp, and for the aux variant one WarpColumnSums per
// warp.
template <int S, int V, bool kAux>
constexpr size_t segment_smem_bytes() {
  return size_t(S * V) * sizeof(float) * (kAux ? 2 : 1) +
         kWarpsPerBlock * (sizeof(SegmentScratch<S, V>) + (kAux ? sizeof(WarpColumnSums<S, V>) : 0));
}

// Register cap 64, four blocks an SM (sm_90a, nvcc 13.0): with 32 experts a lane, the 16-bit routing kernels
// spill a few words (20 bytes of stores, DeepSeek-V3's 16), the aux variants up to 60.
template <class In, int S, int V, bool kAux, Fixed kFixed>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 4)
    route_segment_kernel(RouteConfig config, const typename In::storage* __restrict__ x, BiasLoader bias, int64_t T,
                         int lpg_arg, float* __restrict__ w, int32_t* __restrict__ idx, AuxArgs aux) {
  constexpr int kPad = S * V, kTokensPerWarp = 32 / S;
  const RouteConfig c = kernel_config<kFixed>(config);
  const AuxConfig aux_cfg = kernel_aux_config<kFixed>(aux.cfg);
  // Lanes of a group (DeepSeek-V3: 32 experts); none without groups.
  const int lpg = kFixed == Fixed::kNone ? lpg_arg : c.num_groups ? int(c.group_size()) / V : 0;
  extern __shared__ __align__(16) float smem[];
  float* sbias = smem;
  int* counts = reinterpret_cast<int*>(smem + kPad);
  auto* scratch = reinterpret_cast<SegmentScratch<S, V>*>(smem + kPad * (kAux ? 2 : 1));
  auto* column_sums = reinterpret_cast<WarpColumnSums<S, V>*>(scratch + kWarpsPerBlock);
  const int E = int(c.num_experts);
  const int warp = threadIdx.x / 32;
  const SegmentLanes<S> g(threadIdx.x & 31);
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock * kTokensPerWarp;
  const int64_t first = (int64_t(blockIdx.x) * kWarpsPerBlock + warp) * kTokensPerWarp;
  // The compiled-in routing kernels at small T (a warp a token) load a warp's first rows before the bias is
  // staged, so that the two latencies overlap, and each next rows at the end of an iteration: DeepSeek-V3
  // T = 64 bf16 2.56 -> 2.43 us, T = 1024 2.75 -> 2.62 (H100). At 8 lanes a token (T >= kWideTokens) T = 65536
  // got slower (31.6 -> 34.2), and in the runtime-config kernels it spilled (up to 300 bytes).
  constexpr bool kRowsAhead =
      kFixed != Fixed::kNone && !kAux && S == 32 && V * sizeof(typename In::storage) % 16 == 0;  // StoredRow's
  StoredRow<In, S, V> stored;
  if constexpr (kRowsAhead)
    if (first < T) stored.load(g, x + min(first + g.segment(), T - 1) * E);
  for (int e = threadIdx.x; e < kPad; e += blockDim.x) {
    sbias[bias_slot<S, V>(e)] = e < E ? bias(e) + 0.0f : 0.0f;  // once per block; never -0.0 (rank_key_no_neg_zero)
    if constexpr (kAux) counts[e] = 0;
  }
  if constexpr (kAux)
#pragma unroll
    for (int j = 0; j < WarpColumnSums<S, V>::kOwned; ++j) column_sums[warp].sums[j][g.lane] = 0.0f;
  __syncthreads();
  SegmentScratch<S, V>& s = scratch[warp];
  for (int64_t t0 = first; t0 < T; t0 += stride) {
    const int64_t t = t0 + g.segment();
    const bool valid = t < T;
    const int64_t row = valid ? t : T - 1;  // segments past T route a copy of the last token
    float xv[V];
    if constexpr (kRowsAhead)
      stored.to_floats(xv);
    else
      load_segment_row<In, S, V>(g, x + row * E, E, xv);
    route_token_segment<In, S, V, kAux, kFixed>(g, c, aux_cfg, lpg, xv, x + row * E, valid,
                                                reinterpret_cast<const float4*>(sbias) + g.sl, s, column_sums + warp,
                                                counts, w + row * c.topk, idx + row * c.topk);
    // Not at the start of the next iteration: stored, not reloaded for the first rows, would then stay live
    // through the whole iteration.
    if constexpr (kRowsAhead)
      if (t0 + stride < T) stored.load(g, x + min(t + stride, T - 1) * E);
  }
  if constexpr (kAux) {
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {  // added in warp order: deterministic
      float acc = 0.0f;
      for (int wi = 0; wi < kWarpsPerBlock; ++wi) acc += column_sums[wi].of_expert(e);
      aux.ws_colsum[int64_t(blockIdx.x) * E + e] = acc;
      aux.ws_counts[int64_t(blockIdx.x) * E + e] = counts[e];
    }
  }
}

// ------------------------------------------------- DeepSeek-V3, 16-bit rows, 8 lanes a token
// route_deepseek_v3_kernel: the segment path's layout (lane sl of a token's 8 holds group sl, 32 experts) with
// the selection cut to what this config needs, for rows without NaN whose candidates fit 32-bit sort keys; a warp
// where some token does not fit takes the segment path's exact code (route_set_exact). Against that code (ncu,
// session 17: 1088 warp instructions a set of 4 tokens): NaN is found by the group top 2 (max.NaN) instead of a
// test an element; group ranks compare keys against one threshold per bit of the partner's offset; the candidates'
// sort keys are 32-bit (the value's key above the threshold's, then the expert), so that a step of their sort
// takes a shuffle where the 64-bit keys took two and their comparisons; the rows' offsets are 32-bit; bf16
// converts a word at a time. 869 warp instructions a set (ncu, against 1088): on an H100 T = 16384 9.9 -> 9.2 us,
// but T = 65536 only 28.2 -> 26.75, still latency-bound (RESULTS.md, session 18).

// A warp's 4 rows of 512 bytes as loaded: warp load r reads row r whole (512 contiguous bytes, where a lane's own
// run of 64 bytes touches 16 lines a warp load, half of each sector: ncu, T = 16384, 634 k -> 372 k L1 sectors,
// session 16). Lane l loads piece 4 (l % 8) + l / 8 of each row and stores it at [r][l]: segment lane sl then finds
// its pieces 4 sl + j at [r][8 j + sl], and the lanes of a quarter warp store and read 8 distinct 16-byte bank
// slots, at offsets that are constants from one address.
__device__ int loaded_piece(int lane) { return 4 * (lane & 7) + lane / 8; }

// Candidates a token the lean kernel sorts (in chunks of 16): random DeepSeek-V3 rows have 11 on average, more than
// 16 in 4% of rows, more than 32 in 0.008% (5 rows of 65536), none past 48 (a numpy model of routing.py's rows).
constexpr int kLeanCandidates = 64;

// Shared memory of a warp: the rows as loaded, then each lane's 32 selection values (a row of 36 floats a lane:
// its 16-byte stores are free of bank conflicts), and each segment's candidates; or the exact path's scratch.
struct DeepSeekV3Scratch {
  union {
    uint4 rows[4 * 32];
    float sel[32][36];
  };
  uint32_t cand[4][kLeanCandidates];
};
union DeepSeekV3WarpMemory {
  DeepSeekV3Scratch lean;
  SegmentScratch<8, 32> exact;
};

// Two 16-bit values of a word as floats: bf16 by a shift and a mask (the compiler's per-element form took a byte
// permute and a shift for the high one).
template <class In>
__device__ void word_to_floats(uint32_t w, float& lo, float& hi) {
  if constexpr (std::is_same_v<In, BF16>) {
    lo = __uint_as_float(w << 16), hi = __uint_as_float(w & 0xffff0000u);
  } else {
    lo = In::to_float(uint16_t(w)), hi = In::to_float(uint16_t(w >> 16));
  }
}

// max and min of each 16-bit half of two words (ignoring a NaN, as fmaxf).
template <class In>
__device__ uint32_t max2(uint32_t a, uint32_t b) {
  uint32_t r;
  if constexpr (std::is_same_v<In, BF16>) asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  else asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
template <class In>
__device__ uint32_t min2(uint32_t a, uint32_t b) {
  uint32_t r;
  if constexpr (std::is_same_v<In, BF16>) asm("min.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  else asm("min.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

// The best two of a lane's 32 logits, kept a pair of halves at a time (3 instructions a word where the floats took 3
// an element).
template <class In>
struct LaneTop2 {
  uint32_t t1 = 0xff80ff80u, t2 = 0xff80ff80u;  // -inf, -inf in both halves (bf16; f16 below)
  __device__ LaneTop2() {
    if constexpr (!std::is_same_v<In, BF16>) t1 = t2 = 0xfc00fc00u;
  }
  __device__ void add(uint32_t w) { t2 = max2<In>(t2, min2<In>(t1, w)), t1 = max2<In>(t1, w); }
  __device__ void add(const uint4& p) { add(p.x), add(p.y), add(p.z), add(p.w); }
  // The best and second best as floats.
  __device__ void get(float& best, float& second) const {
    float a1, b1, a2, b2;
    word_to_floats<In>(t1, a1, b1);
    word_to_floats<In>(t2, a2, b2);
    best = fmaxf(a1, b1), second = fmaxf(fminf(a1, b1), fmaxf(a2, b2));
  }
};

// This lane's 32 logits of row t0 + segment (a copy of the last row past T); with top2, also their best two.
template <class In>
__device__ void load_set_rows(const SegmentLanes<8>& g, const typename In::storage* x, int64_t t0, int64_t T,
                              uint4* rows, float (&xv)[32], LaneTop2<In>* top2 = nullptr) {
  const uint4* first = reinterpret_cast<const uint4*>(x + t0 * 256) + loaded_piece(g.lane);
  const int last = int(min(T - 1 - t0, int64_t(3)));
  __syncwarp();  // a warp that loops: its previous set may still read the scratch
#pragma unroll
  for (int r = 0; r < 4; ++r) rows[32 * r + g.lane] = __ldg(first + min(r, last) * 32);
  __syncwarp();
  const uint4* mine = rows + 32 * g.segment() + g.sl;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint4 piece = mine[8 * j];
    if (top2) top2->add(piece);
    word_to_floats<In>(piece.x, xv[8 * j], xv[8 * j + 1]);
    word_to_floats<In>(piece.y, xv[8 * j + 2], xv[8 * j + 3]);
    word_to_floats<In>(piece.z, xv[8 * j + 4], xv[8 * j + 5]);
    word_to_floats<In>(piece.w, xv[8 * j + 6], xv[8 * j + 7]);
  }
}

// max and min that return NaN if either operand is NaN (fmaxf returns the other operand).
__device__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ float min_nan(float a, float b) {
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// Sorts v over the segment's 8 lanes, descending (or ascending), by a bitonic network of 6 steps.
template <bool kDescending>
__device__ uint32_t sort8(const SegmentLanes<8>& g, uint32_t v) {
#pragma unroll
  for (int size = 2; size <= 8; size <<= 1)
#pragma unroll
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      const uint32_t other = __shfl_xor_sync(kFullMask, v, stride);
      const bool keep_max = (((g.sl & stride) == 0) == ((g.sl & size) == 0)) == kDescending;
      v = keep_max ? max(v, other) : min(v, other);
    }
  return v;
}

// Sorts a bitonic sequence over the segment's 8 lanes, descending, in 3 steps.
__device__ uint32_t merge8(const SegmentLanes<8>& g, uint32_t v) {
#pragma unroll
  for (int stride = 4; stride > 0; stride >>= 1) {
    const uint32_t other = __shfl_xor_sync(kFullMask, v, stride);
    v = (g.sl & stride) == 0 ? max(v, other) : min(v, other);
  }
  return v;
}

// The 8 largest of v[0, 16) (a segment's), descending in its lanes: A = v[0, 8) sorted descending and B = v[8, 16)
// ascending give them as max(A[i], B[i]), a bitonic sequence.
__device__ uint32_t top8_of_16(const SegmentLanes<8>& g, const uint32_t* v) {
  return merge8(g, max(sort8<true>(g, v[g.sl]), sort8<false>(g, v[8 + g.sl])));
}

// A segment's candidates, its values v(i) >= cut: this lane's as the bits of mask, the slot of its first among the
// segment's, and the segment's total.
struct SegmentCandidates {
  uint32_t mask = 0;
  int first, total;
};

template <class ValueOf>
__device__ SegmentCandidates candidates_reaching(const SegmentLanes<8>& g, ValueOf v, float cut) {
  SegmentCandidates c;
#pragma unroll
  for (int i = 0; i < 32; ++i)
    if (v(i) >= cut) c.mask |= 1u << i;
  const int count = __popc(c.mask);
  c.first = g.exclusive_sum(count);
  c.total = g.shfl(c.first + count, 7);
  return c;
}

// Stages a segment's candidates c (c.total <= the room at cand) for top8_of_16: their sort keys, the rank key
// key_of(i) (>= tau_key, within 2^24 of it) above tau's, then 255 - expert, and zeros up to the chunks of 16 that the
// warp's fullest token needs, whose number it returns.
template <class KeyOf>
__device__ int stage_candidates(const SegmentLanes<8>& g, SegmentCandidates c, KeyOf key_of, uint32_t tau_key,
                                uint32_t* cand) {
  const int chunks = (__reduce_max_sync(kFullMask, c.total) + 15) / 16;
  const uint32_t key_base = 255u - uint32_t(g.sl * 32) - tau_key * 256u;
  for (int slot = c.first; c.mask; c.mask &= c.mask - 1, ++slot) {
    const int i = __ffs(c.mask) - 1;
    cand[slot] = key_of(i) * 256u + (key_base - uint32_t(i));
  }
  // Key 0 ranks last (or ties expert 255 at tau, which decodes the same).
  for (int z = c.total + g.sl; z < 16 * chunks; z += 8) cand[z] = 0;
  return chunks;
}

// The top 8 of the staged candidates' keys, given best, the top 8 of their first chunk: the top 8 so far against
// each further chunk's, reversed, is a bitonic sequence.
__device__ uint32_t merge_chunks(const SegmentLanes<8>& g, uint32_t best, int chunks, const uint32_t* cand) {
  for (int q = 1; q < chunks; ++q)
    best = merge8(g, max(best, __shfl_sync(kFullMask, top8_of_16(g, cand + 16 * q), g.base() + 7 - g.sl)));
  return best;
}

__device__ int expert_of_key(uint32_t key) { return 255 - int(key & 255u); }

// The expert of rank g.sl among a segment's candidates c (c.total <= kLeanCandidates), whose rank keys key_of(i) are
// >= tau_key and within 2^24 of it, sorted in chunks of 16 as the warp's fullest token needs.
template <class KeyOf>
__device__ int top8_of_candidates(const SegmentLanes<8>& g, SegmentCandidates c, KeyOf key_of, uint32_t tau_key,
                                  uint32_t* cand) {
  const int chunks = stage_candidates(g, c, key_of, tau_key, cand);
  __syncwarp();
  return expert_of_key(merge_chunks(g, top8_of_16(g, cand), chunks, cand));
}

// The first half of route_set_lean: a segment's group choice, its threshold tau and the values (sel_of(i), this lane's
// 32 sigmoid scores plus bias) that reach it, and whether the lean selection cannot take the token (a NaN score, or
// candidates too far apart for 32-bit keys).
struct LeanRouteCut {
  uint32_t tau_key;
  bool exact;
  SegmentCandidates c;
};

template <class SelOf>
__device__ LeanRouteCut lean_route_cut(const SegmentLanes<8>& g, SelOf sel_of) {
  float t1 = -INFINITY, t2 = -INFINITY;  // this group's best two; NaN if it holds a NaN
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const float v = sel_of(i);
    t2 = max_nan(t2, min_nan(t1, v)), t1 = max_nan(t1, v);
  }
  const float score = t1 + t2;
  // Group sl ^ o ranks before this one if its key is larger, or equal where sl ^ o < sl (which depends only on the
  // highest bit of o): one comparison against a threshold per bit.
  const uint32_t key = rank_key_unless_nan(score);
  uint32_t beaten_by[3];
#pragma unroll
  for (int b = 0; b < 3; ++b) beaten_by[b] = g.sl & (1 << b) ? key - 1 : key;
  int rank = 0;  // groups ranked before this one
#pragma unroll
  for (int o = 1; o < 8; ++o) rank += __shfl_xor_sync(kFullMask, key, o) > beaten_by[o >= 4 ? 2 : o >= 2 ? 1 : 0];
  const bool kept = rank < kDeepSeekV3Config.group_topk;
  float tau = kept ? t2 : INFINITY, top = kept ? t1 : -INFINITY;
#pragma unroll
  for (int off = 4; off; off >>= 1)
    tau = fminf(tau, __shfl_xor_sync(kFullMask, tau, off)), top = fmaxf(top, __shfl_xor_sync(kFullMask, top, off));
  // A candidate's key: its value's rank key above tau's, then 255 - expert; exact while the keys differ by < 2^24.
  LeanRouteCut cut;
  cut.tau_key = rank_key_unless_nan(tau);
  cut.exact = score != score || rank_key_unless_nan(top) - cut.tau_key >= (1u << 24);
  cut.c = candidates_reaching(g, sel_of, kept ? tau : NAN);  // nothing reaches NaN: dropped groups have no candidates
  return cut;
}

// Whether a lean selection takes the warp: none of its tokens' cuts (LeanRouteCut, LeanAuxCut) is exact-only or has
// more than kLeanCandidates candidates.
template <class Cut>
__device__ bool lean_takes_warp(const Cut& cut) {
  return !__any_sync(kFullMask, cut.exact || cut.c.total > kLeanCandidates);
}

// Writes a token's experts and their weights (as write_routing), expert the one of rank g.sl and v its score.
__device__ void write_lean_route(const SegmentLanes<8>& g, float scaling, int expert, float v, bool valid,
                                 float* w_out, int32_t* idx_out) {
  const float total_v = g.sum(v) + kEps;
  if (valid) w_out[g.sl] = v / total_v * scaling, idx_out[g.sl] = expert;
}

// Routes the warp's 4 tokens, given sel (this lane's 32 sigmoid scores plus bias), unless some token of the warp
// has a NaN score, more than kLeanCandidates candidates or candidates too far apart for 32-bit keys: then it
// returns false, having written nothing. The same selection as the segment path's on floats (select_on_floats):
// the 4 groups of the best top-2 sums (ties: the lower group), the threshold tau = the least second best of those
// groups, and the top 8 of their values >= tau (ties: the lower expert). A warp sorts as many chunks of 16 as its
// fullest token needs: the exact path instead holds up the warp's whole block (sent there past 16 candidates,
// T = 16384 took 12.3 us against 9.3, H100, session 18).
template <class In>
__device__ bool route_set_lean(const SegmentLanes<8>& g, float scaling, const float (&sel)[32], DeepSeekV3Scratch& s,
                               const typename In::storage* row, bool valid, float* w_out, int32_t* idx_out) {
  const LeanRouteCut cut = lean_route_cut(g, [&](int i) { return sel[i]; });
  if (!lean_takes_warp(cut)) return false;
  const float* mine = s.sel[g.lane];
  const int expert = top8_of_candidates(
      g, cut.c, [&](int i) { return rank_key_unless_nan(mine[i]); }, cut.tau_key, s.cand[g.segment()]);
  write_lean_route(g, scaling, expert, sigmoid(In::to_float(row[expert])), valid, w_out, idx_out);  // from the logits
  return true;
}

// The segment path's exact routing of this lane's token, for warps route_set_lean refuses. Not inlined: its code
// then does not weigh on the registers of the lean path.
template <class In>
__device__ __noinline__ void route_set_exact(int lane, float scaling, const typename In::storage* row, bool valid,
                                             const float4* bias, SegmentScratch<8, 32>* s, float* w_out,
                                             int32_t* idx_out) {
  const SegmentLanes<8> g(lane);
  RouteConfig scaled;
  scaled.scaling_factor = scaling;
  __syncwarp();  // the lean path's reads of the scratch
  float xv[32];
  load_segment_row<In, 8, 32>(g, row, 256, xv);
  route_token_segment<In, 8, 32, false, Fixed::kDeepSeekV3>(g, kernel_config<Fixed::kDeepSeekV3>(scaled),
                                                            kernel_aux_config<Fixed::kDeepSeekV3>(AuxConfig{}), 1, xv,
                                                            row, valid, bias, *s, nullptr, nullptr, w_out, idx_out);
}

// A block per 32 tokens, one set of 4 a warp (past INT_MAX blocks the warps loop): warps that loop over sets on one
// resident wave, loading the next set's rows while they route one (cp.async), were slower (T = 65536 28.0 -> 35 us,
// H100, RESULTS.md, session 18), and so were blocks of 16, 4 or 2 warps and two sets a warp. Shared memory: the bias
// as route_segment_kernel stages it, then a DeepSeekV3WarpMemory a warp.
template <class In>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 4)
    route_deepseek_v3_kernel(float scaling, const typename In::storage* __restrict__ x, BiasLoader bias, int64_t T,
                             float* __restrict__ w, int32_t* __restrict__ idx) {
  constexpr int E = 256, K = 8;
  extern __shared__ __align__(16) float smem[];
  float* sbias = smem;
  auto& memory = reinterpret_cast<DeepSeekV3WarpMemory*>(smem + E)[threadIdx.x / 32];
  const SegmentLanes<8> g(threadIdx.x & 31);
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    sbias[bias_slot<8, 32>(e)] = bias(e) + 0.0f;  // never -0.0: neither is a score plus bias
  __syncthreads();
  const float4* b4 = reinterpret_cast<const float4*>(sbias) + g.sl;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock * 4;
  for (int64_t t0 = (int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32) * 4; t0 < T; t0 += stride) {
    const int64_t t = t0 + g.segment();
    const bool valid = t < T;
    const int64_t r = valid ? t : T - 1;
    float sel[32];
    load_set_rows<In>(g, x, t0, T, memory.lean.rows, sel);
    __syncwarp();  // the rows are read: the scratch takes the scores
#pragma unroll
    for (int c4 = 0; c4 < 8; ++c4) {
      const float4 b = b4[c4 * 8];
      sel[4 * c4] = sigmoid(sel[4 * c4]) + b.x, sel[4 * c4 + 1] = sigmoid(sel[4 * c4 + 1]) + b.y;
      sel[4 * c4 + 2] = sigmoid(sel[4 * c4 + 2]) + b.z, sel[4 * c4 + 3] = sigmoid(sel[4 * c4 + 3]) + b.w;
      *reinterpret_cast<float4*>(&memory.lean.sel[g.lane][4 * c4]) =
          make_float4(sel[4 * c4], sel[4 * c4 + 1], sel[4 * c4 + 2], sel[4 * c4 + 3]);
    }
    if (!route_set_lean<In>(g, scaling, sel, memory.lean, x + r * E, valid, w + r * K, idx + r * K))
      route_set_exact<In>(g.lane, scaling, x + r * E, valid, b4, &memory.exact, w + r * K, idx + r * K);
  }
}

// ------------------------------------------------------------ route_with_aux_loss's loss
// Where the fused aux forward leaves the call's statistics and its loss C_coeff · Σ_e colsum_e · counts_e.
struct AuxOutputs {
  float* colsum;
  int32_t* counts;
  float* loss;
};

// Writes the sum of the block's v (kWarpsPerBlock warps) to *total, in a fixed order: a butterfly a warp, then the
// warps in turn.
__device__ void write_block_total(float v, float* total) {
  __shared__ float warp_totals[kWarpsPerBlock];
  for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x != 0) return;
  float sum = 0.0f;
  for (int wi = 0; wi < kWarpsPerBlock; ++wi) sum += warp_totals[wi];
  *total = sum;
}

// The loss of the statistics aux_finalize_kernel wrote: one block.
__global__ void __launch_bounds__(kWarpsPerBlock * 32) aux_loss_of_statistics_kernel(float c_coeff, int64_t E,
                                                                                     AuxOutputs out) {
  float v = 0.0f;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) v += aux_loss_term(out.colsum[e], out.counts[e], c_coeff);
  write_block_total(v, out.loss);
}

// ------------------------------------------- route_with_aux_loss, DeepSeek-V3, 16-bit rows, 8 lanes a token
// route_deepseek_v3_aux_kernel: the lean kernel above plus the aux statistics of its tokens (the clean scores,
// sigmoid normalised over all experts: their column sums, and each token's top 8 by clean score counted). The
// column sums are added over the block's tokens in a fixed order and then to the call's totals as 64-bit fixed
// point (integer atomics: exact, so the sum does not depend on the order the blocks finish in); the last block
// turns the totals into the outputs. No workspace rows and no statistics kernel.
struct DeepSeekV3AuxTotals {  // in the workspace, zeroed before the launch
  unsigned long long colsum[256];  // in units of 2^-32
  unsigned counts[256];
  unsigned nan;          // some block's column sum was NaN
  unsigned blocks_done;  // the last block to finish writes the outputs
};
constexpr float kColsumUnit = 4294967296.0f;  // 2^32: a block's sum of at most 2^7 tokens' scores < 2^39 units

// The least score s with s · inv >= tau, from score (where score · inv = tau, inv > 0): as the rounded product is
// monotonic in s, the scores whose clean scores reach tau are those >= s, one comparison a score instead of a product
// and a comparison. Adjacent floats' products differ by 1/2 to 1 ulp, so the loop takes at most 2 steps.
__device__ float least_score_reaching(float score, float inv, float tau) {
  for (float below; score > 0.0f && (below = __uint_as_float(__float_as_uint(score) - 1u)) * inv >= tau;) score = below;
  return score;
}

// The first half of the lean aux count: a token's threshold tau among its clean scores (num[i] * inv; t1 and t2 are
// two of this lane's scores, its best), the scores that reach it, and whether the lean count cannot take the token.
// tau = the 8th best of the segment's 16 lane top-2 scores, so that at least 8 reach it (8.8 on average on random
// rows). A row with a NaN has only NaN clean scores (inv is NaN), which tie: its top 8 are experts 0 to 7.
struct LeanAuxCut {
  uint32_t tau_key;
  bool nan, exact;
  SegmentCandidates c;
};

__device__ LeanAuxCut lean_aux_cut(const SegmentLanes<8>& g, const float (&num)[32], float t1, float t2, float inv) {
  const uint32_t top16 = merge8(g, max(sort8<true>(g, __float_as_uint(t1)), sort8<false>(g, __float_as_uint(t2))));
  const float score_at_tau = __uint_as_float(g.shfl(top16, 7));
  const float tau = score_at_tau * inv;  // that expert's clean score
  LeanAuxCut cut;
  cut.tau_key = rank_key_unless_nan(tau);
  cut.nan = inv != inv;  // then no candidates: every comparison with NaN fails
  // The segment's shuffles run on every lane: inside `!nan && ...` they ran on some lanes only, which hung the warp
  // or faulted (illegal instruction) on NaN rows (sessions 19-20).
  const float top = g.fmax(t1) * inv;
  cut.exact = !cut.nan && rank_key_unless_nan(top) - cut.tau_key >= (1u << 24) - 256;  // see the kernel's top2
  cut.c = candidates_reaching(g, [&](int i) { return num[i]; },
                              cut.nan ? NAN : least_score_reaching(score_at_tau, inv, tau));
  return cut;
}

// Counts a token's expert of rank g.sl (experts 0 to 7 for a NaN row) into counts, where valid.
__device__ void count_lean_aux(const SegmentLanes<8>& g, const LeanAuxCut& cut, int expert, int* counts, bool valid) {
  if (valid) atomicAdd(&counts[cut.nan ? g.sl : expert], 1);
}

// For a warp whose selections took the exact paths, whose scratch is where the scores were: where count (the lean
// count refused the warp), the segment path's exact count (count_clean_topk) of this lane's token, and then the scores
// again at mine, for the column sums. Not inlined, as route_set_exact.
template <class In>
__device__ __noinline__ void aux_count_set_exact(int lane, const typename In::storage* row, float inv, bool valid,
                                                 bool count, SegmentScratch<8, 32>* s, float* mine, int* counts) {
  const SegmentLanes<8> g(lane);
  float num[32];
  load_segment_row<In, 8, 32>(g, row, 256, num);
#pragma unroll
  for (int i = 0; i < 32; ++i) num[i] = sigmoid(num[i]);
  __syncwarp();  // the lean path's reads of the scratch
  if (count) count_clean_topk<8, 32, Spread::kRun>(g, 8, num, inv, 256, valid, *s, counts);  // ends with __syncwarp
#pragma unroll
  for (int c4 = 0; c4 < 8; ++c4)
    *reinterpret_cast<float4*>(mine + 4 * c4) =
        make_float4(num[4 * c4], num[4 * c4 + 1], num[4 * c4 + 2], num[4 * c4 + 3]);
}

// Which of a set's two selections route_and_count_set_lean made.
struct LeanSetDone {
  bool aux, route;
};

// route_with_aux_loss's two selections of the warp's 4 tokens, both lean: the top 8 by clean score, counted into
// counts (count_lean_aux), and the routing (as route_set_lean, on the scores plus bias). Their thresholds and sorts
// run side by side, so that the two chains of shuffles overlap, where one after the other the warp waited on each in
// turn (with the weights below, T = 16384: 18.9 -> 17.0 us in the harness, H100, session 22). A selection that some
// token of the warp does not fit (see lean_aux_cut and lean_route_cut) is left to the exact paths. The candidates of
// both share the segment's row where each token has at most half of kLeanCandidates of each kind; past that, the two
// sort one after the other. num is also at mine; t1 and t2 are two of this lane's scores, its best; b4 is this lane's
// bias (as in route_deepseek_v3_kernel).
__device__ LeanSetDone route_and_count_set_lean(const SegmentLanes<8>& g, float scaling, const float (&num)[32],
                                                float t1, float t2, float inv, const float4* b4, DeepSeekV3Scratch& s,
                                                bool valid, int* counts, float* w_out, int32_t* idx_out) {
  const float* mine = s.sel[g.lane];
  const float* bias = reinterpret_cast<const float*>(b4);
  auto bias_of = [&](int i) { return bias[32 * (i / 4) + i % 4]; };  // b4[8 * (i / 4)], component i % 4
  const LeanAuxCut a = lean_aux_cut(g, num, t1, t2, inv);
  const LeanRouteCut r = lean_route_cut(g, [&](int i) { return num[i] + bias_of(i); });
  const LeanSetDone done{lean_takes_warp(a), lean_takes_warp(r)};
  const bool halves_fit = !__any_sync(kFullMask, a.c.total > kLeanCandidates / 2 || r.c.total > kLeanCandidates / 2);
  uint32_t* cand = s.cand[g.segment()];
  auto aux_key = [&](int i) { return rank_key_unless_nan(mine[i] * inv); };
  auto route_key = [&](int i) { return rank_key_unless_nan(mine[i] + bias_of(i)); };
  // An expert's weight from its score, kept by the segment's lane expert / 32: the sigmoid of its logit, bit for bit.
  auto write_route = [&](int expert) {
    write_lean_route(g, scaling, expert, s.sel[g.base() + expert / 32][expert % 32], valid, w_out, idx_out);
  };
  if (done.aux && done.route && halves_fit) {
    uint32_t* route_cand = cand + kLeanCandidates / 2;
    const int aux_chunks = stage_candidates(g, a.c, aux_key, a.tau_key, cand);
    const int route_chunks = stage_candidates(g, r.c, route_key, r.tau_key, route_cand);
    __syncwarp();
    const uint32_t aux_best = top8_of_16(g, cand), route_best = top8_of_16(g, route_cand);
    count_lean_aux(g, a, expert_of_key(merge_chunks(g, aux_best, aux_chunks, cand)), counts, valid);
    write_route(expert_of_key(merge_chunks(g, route_best, route_chunks, route_cand)));
    return done;
  }
  if (done.aux) count_lean_aux(g, a, top8_of_candidates(g, a.c, aux_key, a.tau_key, cand), counts, valid);
  __syncwarp();  // the aux sort's reads of cand
  if (done.route) write_route(top8_of_candidates(g, r.c, route_key, r.tau_key, cand));
  return done;
}

// Adds token j's (of the block) clean scores of experts 4 quad to 4 quad + 3 to column: one 16-byte load of the
// scores the token's segment lane quad / 8 keeps in its selection row (a quarter warp reads 128 contiguous bytes).
__device__ void add_scores(float4& column, const DeepSeekV3WarpMemory* memory, const float* inv_of, int j, int quad) {
  const float4 v = *reinterpret_cast<const float4*>(&memory[j / 4].lean.sel[8 * (j % 4) + quad / 8][4 * (quad % 8)]);
  const float inv = inv_of[j];
  column.x = fmaf(v.x, inv, column.x), column.y = fmaf(v.y, inv, column.y);
  column.z = fmaf(v.z, inv, column.z), column.w = fmaf(v.w, inv, column.w);
}

// Waits for the other warp of this thread's pair (warps 2p and 2p + 1, threads 64p to 64p + 63), whose tokens are the
// ones this thread's column adds read (add_scores): named barrier 1 + p, so that a pair does not wait for the block.
__device__ void sync_warp_pair() { asm volatile("bar.sync %0, 64;" ::"r"(1 + int(threadIdx.x / 64)) : "memory"); }

// The block's column sum of expert threadIdx.x: the 4 parts of add_scores' tokens added in order, through the warps'
// memory (free once the block's tokens are routed).
__device__ float block_column_sum(float4 column, DeepSeekV3WarpMemory* memory) {
  float* parts = reinterpret_cast<float*>(memory);  // [part][expert]
  __syncthreads();
  reinterpret_cast<float4*>(parts)[threadIdx.x] = column;
  __syncthreads();
  const int e = threadIdx.x;
  return ((parts[e] + parts[256 + e]) + parts[512 + e]) + parts[768 + e];
}

// One resident wave of blocks of 32 tokens at most (the grid depends on T alone), looping over the tokens in
// step: after a set's two selections (route_and_count_set_lean) each pair of warps adds up its clean scores, a thread 4
// experts' columns over its pair's 8 tokens (add_scores), from the warps' selection rows (in registers, across the
// barriers and the exact paths' calls, the scores spilled 572 bytes). The block's counts go to the call's totals with
// its column sums, at the end. Shared memory: the bias, the block's counts, each token's 1 / Σ score, then a
// DeepSeekV3WarpMemory a warp.
template <class In>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 4)
    route_deepseek_v3_aux_kernel(float scaling, const typename In::storage* __restrict__ x, BiasLoader bias, int64_t T,
                                 float* __restrict__ w, int32_t* __restrict__ idx, DeepSeekV3AuxTotals* totals,
                                 float c_coeff, AuxOutputs out) {
  constexpr int E = 256, K = 8;
  static_assert(kWarpsPerBlock * 32 == E, "a thread a column");
  extern __shared__ __align__(16) float smem[];
  float* sbias = smem;
  int* counts = reinterpret_cast<int*>(smem + E);
  float* inv_of = smem + 2 * E;  // [token of the block]
  auto* memory = reinterpret_cast<DeepSeekV3WarpMemory*>(smem + 2 * E + 32);
  const int warp = threadIdx.x / 32;
  DeepSeekV3Scratch& s = memory[warp].lean;
  const SegmentLanes<8> g(threadIdx.x & 31);
  float* mine = s.sel[g.lane];
  sbias[bias_slot<8, 32>(threadIdx.x)] = bias(threadIdx.x) + 0.0f;
  counts[threadIdx.x] = 0;
  __syncthreads();
  const float4* b4 = reinterpret_cast<const float4*>(sbias) + g.sl;
  // This thread's column sums: experts 4 quad to 4 quad + 3 over the block's tokens 8 part to 8 part + 7.
  const int quad = threadIdx.x % 64, part = threadIdx.x / 64;
  float4 column = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int64_t block_t0 = int64_t(blockIdx.x) * 32; block_t0 < T; block_t0 += int64_t(gridDim.x) * 32) {
    const int64_t t0 = block_t0 + warp * 4, t = t0 + g.segment();
    const bool active = t0 < T, valid = t < T;
    const int64_t r = valid ? t : T - 1;
    if (active) {
      float num[32], best, second;
      LaneTop2<In> top2;
      load_set_rows<In>(g, x, t0, T, s.rows, num, &top2);
      top2.get(best, second);
      __syncwarp();  // the rows are read: the scratch takes the scores
      float sum = 0.0f;
#pragma unroll
      for (int c4 = 0; c4 < 8; ++c4) {
#pragma unroll
        for (int j = 4 * c4; j < 4 * c4 + 4; ++j) sum += (num[j] = sigmoid(num[j]));
        *reinterpret_cast<float4*>(mine + 4 * c4) =
            make_float4(num[4 * c4], num[4 * c4 + 1], num[4 * c4 + 2], num[4 * c4 + 3]);
      }
      const float inv = 1.0f / (g.sum(sum) + kEps);  // as segment_clean_scores
      if (g.sl == 0) inv_of[4 * warp + g.segment()] = inv;
      __syncwarp();  // mine is stored
      // The lane's best two scores are the scores of its best two logits: sigmoid is monotonic (if its
      // approximation were not, by an ulp, tau would still be a score of 8 experts, and the maximum's key off by a
      // few units: the margin of lean_aux_cut's test).
      const LeanSetDone done = route_and_count_set_lean(g, scaling, num, sigmoid(best), sigmoid(second), inv, b4, s,
                                                        valid, counts, w + r * K, idx + r * K);
      if (!done.route)
        route_set_exact<In>(g.lane, scaling, x + r * E, valid, b4, &memory[warp].exact, w + r * K, idx + r * K);
      if (!done.aux || !done.route)
        aux_count_set_exact<In>(g.lane, x + r * E, inv, valid, !done.aux, &memory[warp].exact, mine, counts);
    }
    // A pair of warps waits for itself, not for the block: T = 65536 46.9 -> 44.3 us, T = 16384 16.55 -> 16.4 in the
    // harness (H100, rows from DRAM, session 23).
    sync_warp_pair();
    const bool last_set = block_t0 + int64_t(gridDim.x) * 32 >= T;
    const int tokens = int(min(T - block_t0, int64_t(32)));
    if (tokens == 32) {
#pragma unroll
      for (int j = 0; j < 8; ++j) add_scores(column, memory, inv_of, 8 * part + j, quad);
    } else {
      for (int j = 8 * part; j < min(8 * part + 8, tokens); ++j) add_scores(column, memory, inv_of, j, quad);
    }
    if (!last_set) sync_warp_pair();  // the pair's column adds' reads before its next set's rows
  }
  const int e = threadIdx.x;
  const float colsum = block_column_sum(column, memory);
  atomicAdd(&totals->counts[e], unsigned(counts[e]));  // final: block_column_sum's barriers follow every warp's count
  if (colsum != colsum) atomicOr(&totals->nan, 1u);
  atomicAdd(&totals->colsum[e], __float2ull_rn(colsum * kColsumUnit));
  __shared__ bool last;
  __syncthreads();  // every thread's totals before thread 0's release
  if (threadIdx.x == 0) {
    cuda::atomic_ref<unsigned, cuda::thread_scope_device> done(totals->blocks_done);
    last = done.fetch_add(1u, cuda::memory_order_acq_rel) == gridDim.x - 1;
  }
  __syncthreads();  // the other threads' reads follow thread 0's acquire
  if (!last) return;
  // The three loads issued together: with the column sum's load under the NaN flag's test, the compiler waited for
  // the flag first, a second round trip to L2 at the end of the kernel.
  const unsigned nan = __ldcg(&totals->nan);
  const float fixed_sum = float(__ldcg(&totals->colsum[e])) / kColsumUnit;
  const int32_t count = int32_t(__ldcg(&totals->counts[e]));
  const float sum = nan ? NAN : fixed_sum;
  out.colsum[e] = sum, out.counts[e] = count;
  write_block_total(aux_loss_term(sum, count, c_coeff), out.loss);
}

// This lane's clean scores num[i] · inv_denom of a row of E experts, to out (the row): 16-byte stores of
// contiguous pieces where the lanes' V experts make up the whole row.
template <int S, int V>
__device__ void store_segment_scores(const SegmentLanes<S>& g, const float (&num)[V], float inv_denom, int E,
                                     float* out) {
  constexpr Spread P = Spread::kInterleaved;
  if (E == S * V) {  // then every piece of 4 experts is 16-byte aligned
#pragma unroll
    for (int c = 0; c < V / 4; ++c)
      *reinterpret_cast<float4*>(out + expert_at<P, S, V>(g.sl, 4 * c)) =
          make_float4(num[4 * c] * inv_denom, num[4 * c + 1] * inv_denom, num[4 * c + 2] * inv_denom,
                      num[4 * c + 3] * inv_denom);
    return;
  }
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (expert_at<P, S, V>(g.sl, i) < E) out[expert_at<P, S, V>(g.sl, i)] = num[i] * inv_denom;
}

// aux_loss_scores' forward on the segment layout, lanes holding interleaved pieces of the row (no groups to
// keep together): each token's clean scores written as float32, its top k counted into the block's
// histogram, which is added to counts (zeroed before) with integer atomics.
// Dynamic shared memory as route_segment_kernel's: the histogram [S*V] where the bias would be, then a
// SegmentScratch per warp.
template <class In, int S, int V>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 4)
    aux_scores_segment_kernel(ScoreFunction f, int k, const typename In::storage* __restrict__ x, int64_t T,
                              int E, float* __restrict__ scores, int* counts) {
  constexpr int kTokensPerWarp = 32 / S;
  extern __shared__ __align__(16) float smem[];
  int* hist = reinterpret_cast<int*>(smem);
  auto* scratch = reinterpret_cast<SegmentScratch<S, V>*>(smem + S * V);
  for (int e = threadIdx.x; e < S * V; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int warp = threadIdx.x / 32;
  const SegmentLanes<S> g(threadIdx.x & 31);
  const Carry carry = score_carry(f);
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock * kTokensPerWarp;
  for (int64_t t0 = (int64_t(blockIdx.x) * kWarpsPerBlock + warp) * kTokensPerWarp; t0 < T; t0 += stride) {
    const int64_t t = t0 + g.segment();
    const bool valid = t < T;
    const int64_t row = valid ? t : T - 1;
    float xv[V], num[V];
    load_segment_row<In, S, V, Spread::kInterleaved>(g, x + row * E, E, xv);
    const float inv_denom = segment_clean_scores<S, V>(g, carry, xv, num);
    if (valid) store_segment_scores<S, V>(g, num, inv_denom, E, scores + row * E);
    count_clean_topk<S, V, Spread::kInterleaved>(g, k, num, inv_denom, E, valid, scratch[warp], hist);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (hist[e]) atomicAdd(counts + e, hist[e]);
}

// ------------------------------------------------------- one thread per token
// For E <= 32 a warp would idle most lanes: each thread routes a whole token from registers.
template <class In, int V>
__device__ void load_row(const typename In::storage* row, int E, float (&xv)[V]) {
  using S = typename In::storage;
  constexpr int kBytes = V * int(sizeof(S));
  if constexpr (kBytes % 16 == 0) {
    if (E == V) {  // then every row starts 16-byte aligned
      alignas(16) S buf[V];
#pragma unroll
      for (int c = 0; c < kBytes / 16; ++c)
        reinterpret_cast<uint4*>(buf)[c] = __ldg(reinterpret_cast<const uint4*>(row) + c);
#pragma unroll
      for (int i = 0; i < V; ++i) xv[i] = In::to_float(buf[i]);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) xv[i] = i < E ? In::to_float(row[i]) : 0.0f;
}

// Index of the best key (kExcluded once taken), which it then marks taken.
template <int V>
__device__ int take_best(uint32_t (&key)[V]) {
  uint32_t bk = kExcluded;
  int bi = 0;
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (key[i] > bk) bk = key[i], bi = i;
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (i == bi) key[i] = kExcluded;
  return bi;
}

template <int V>
__device__ void aux_token_thread(const AuxConfig& a, const float (&xv)[V], int E, float (&colsum)[V], int* counts) {
  const bool softmax = a.score_function == ScoreFunction::kSoftmax;
  float mx = -INFINITY;
  if (softmax)
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (i < E) mx = fmaxf(mx, xv[i]);
  float num[V], total = 0.0f;
  with_score_function(a.score_function, [&]<ScoreFunction F>() {  // chosen once, not per element
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if constexpr (F == ScoreFunction::kSoftmax)
        num[i] = i < E ? expf(xv[i] - mx) : 0.0f;
      else
        num[i] = i < E ? elementwise_score(F, xv[i]) : 0.0f;
      total += num[i];
    }
  });
  const float inv_denom = 1.0f / (softmax ? total : total + kEps);  // as CleanStats
  uint32_t key[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const float s = num[i] * inv_denom;
    if (i < E) colsum[i] += s;
    key[i] = i < E ? rank_key(s) : kExcluded;
  }
  for (int j = 0; j < a.topk; ++j) atomicAdd(&counts[take_best<V>(key)], 1);
}

// Routes one token given its logits xv (loaded by the caller, ahead of time).
template <class In, int V, bool kAux>
__device__ void route_token_thread(const RouteConfig& c, const AuxConfig& a, const float (&xv)[V],
                                   const float* sbias, float (&colsum)[V], int* counts, float* w_out,
                                   int32_t* idx_out) {
  const int E = int(c.num_experts);
  if constexpr (kAux) aux_token_thread<V>(a, xv, E, colsum, counts);
  const bool softmax = c.score_function == ScoreFunction::kSoftmax;
  float mx = -INFINITY, sum = 0.0f;
  if (softmax) {
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (i < E) mx = fmaxf(mx, xv[i]);
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (i < E) sum += expf(xv[i] - mx);
  }
  uint32_t key[V];
  float val[V];
  // The score function chosen once: per element, the unrolled code would compute all three.
  with_score_function(c.score_function, [&]<ScoreFunction F>() {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      float s;
      if constexpr (F == ScoreFunction::kSoftmax)
        s = expf(xv[i] - mx) / sum;
      else
        s = elementwise_score(F, xv[i]);
      val[i] = carried_value(c, xv[i], s);
      key[i] = i < E ? rank_key_no_neg_zero(val[i] + sbias[i]) : kExcluded;
    }
  });
  float wk[V];  // the chosen values, then weights: finalized here rather than re-read from w_out
  for (int j = 0; j < c.topk; ++j) {
    const int bi = take_best<V>(key);
    float bv = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (i == bi) bv = val[i];
    idx_out[j] = bi;
    wk[j] = bv;
  }
  finalize_weights(c, wk);
  for (int j = 0; j < c.topk; ++j) w_out[j] = wk[j];
}

template <class In, int V, bool kAux>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_thread_kernel(RouteConfig c, const typename In::storage* __restrict__ x, BiasLoader bias, int64_t T,
                        float* __restrict__ w, int32_t* __restrict__ idx, AuxArgs aux) {
  constexpr int kThreads = kWarpsPerBlock * 32;
  __shared__ float sbias[V];
  __shared__ int counts[V];
  __shared__ float partial[kAux ? kThreads * V : 1];  // partial[thread][expert], read expert-major below
  const int64_t E = c.num_experts, stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  float xv[V];
  if (first < T) load_row<In, V>(x + first * E, int(E), xv);  // before the bias: the two loads overlap
  if (threadIdx.x < V) {
    sbias[threadIdx.x] = threadIdx.x < E ? bias(threadIdx.x) + 0.0f : 0.0f;  // never -0.0
    counts[threadIdx.x] = 0;
  }
  __syncthreads();
  float colsum[V] = {};
  for (int64_t t = first; t < T; t += stride) {
    if (t != first) load_row<In, V>(x + t * E, int(E), xv);
    route_token_thread<In, V, kAux>(c, aux.cfg, xv, sbias, colsum, counts, w + t * c.topk, idx + t * c.topk);
  }
  if constexpr (kAux) {
    // Stored expert-major ([expert][thread]) so that each thread below adds one expert's column
    // sums over the block's threads in thread order.
#pragma unroll
    for (int i = 0; i < V; ++i) partial[i * kThreads + threadIdx.x] = colsum[i];
    __syncthreads();
    for (int e = threadIdx.x; e < c.num_experts; e += blockDim.x) {
      float acc = 0.0f;
      for (int t = 0; t < kThreads; ++t) acc += partial[e * kThreads + t];
      aux.ws_colsum[int64_t(blockIdx.x) * c.num_experts + e] = acc;
      aux.ws_counts[int64_t(blockIdx.x) * c.num_experts + e] = counts[e];
    }
  }
}

// --------------------------------------------------------------- generic path
// Per-warp shared memory: key[E], val[E], gkey[G], and for the aux variant colsum[E], counts[E].
template <class In, bool kAux>
__global__ void route_generic_kernel(RouteConfig c, const typename In::storage* __restrict__ x, BiasLoader bias,
                                     int64_t T, int warps_per_block, float* __restrict__ w,
                                     int32_t* __restrict__ idx, AuxArgs aux) {
  extern __shared__ uint32_t scratch[];
  const int64_t E = c.num_experts, per_warp = 2 * E + c.num_groups + (kAux ? 2 * E : 0);
  const int warp = threadIdx.x / 32;
  uint32_t* mine = scratch + warp * per_warp;
  const RouteScratch s{mine, reinterpret_cast<float*>(mine + E), mine + 2 * E};
  float* colsum = reinterpret_cast<float*>(mine + 2 * E + c.num_groups);
  int32_t* counts = reinterpret_cast<int32_t*>(colsum + E);
  const WarpLanes L{int(threadIdx.x & 31), kFullMask};
  if constexpr (kAux)
    for (int64_t e = L.lane; e < E; e += 32) colsum[e] = 0.0f, counts[e] = 0;
  const int64_t stride = int64_t(gridDim.x) * warps_per_block;
  for (int64_t t = int64_t(blockIdx.x) * warps_per_block + warp; t < T; t += stride) {
    route_row<WarpLanes, In>(L, c, x + t * E, bias, s, w + t * c.topk, idx + t * c.topk);
    if constexpr (kAux) aux_stats_row<WarpLanes, In>(L, aux.cfg, x + t * E, E, colsum, counts);
    __syncwarp();  // the next token reuses the scratch
  }
  if constexpr (kAux) {
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      float acc = 0.0f;
      int32_t n = 0;
      for (int wi = 0; wi < warps_per_block; ++wi) {
        const uint32_t* theirs = scratch + wi * per_warp + 2 * E + c.num_groups;
        acc += reinterpret_cast<const float*>(theirs)[e];
        n += reinterpret_cast<const int32_t*>(theirs + E)[e];
      }
      aux.ws_colsum[int64_t(blockIdx.x) * E + e] = acc;
      aux.ws_counts[int64_t(blockIdx.x) * E + e] = n;
    }
  }
}

// Adds the first `blocks` rows of the blocks' partial aux statistics in a fixed order. A block takes
// kFinalizeExperts experts, and each warp load reads 32 / kFinalizeExperts rows of them (32 contiguous
// bytes a row): lane l adds rows first(l), first(l) + kFinalizeStep, ... with all its loads in flight at
// once. Then an expert's lanes are added by an xor butterfly, and the warps in order. (A block of 32
// experts, a lane each, left 8 blocks for E = 256, each warp waiting for 32 rows one after another:
// 4.9 µs at T = 16384.)
constexpr int kFinalizeExperts = 8, kFinalizeWarps = 16;
constexpr int kFinalizeStep = kFinalizeWarps * 32 / kFinalizeExperts;  // rows a block reads at once

__global__ void __launch_bounds__(kFinalizeWarps * 32)
    aux_finalize_kernel(const float* __restrict__ ws_colsum, const int32_t* __restrict__ ws_counts, int64_t blocks,
                        int64_t E, float* __restrict__ colsum, int32_t* __restrict__ counts) {
  __shared__ float warp_sum[kFinalizeWarps][kFinalizeExperts];
  __shared__ int32_t warp_count[kFinalizeWarps][kFinalizeExperts];
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32, j = lane % kFinalizeExperts;
  const int64_t e = int64_t(blockIdx.x) * kFinalizeExperts + j;
  float acc = 0.0f;
  int32_t n = 0;
  if (e < E)
#pragma unroll 8
    for (int64_t b = threadIdx.x / kFinalizeExperts; b < blocks; b += kFinalizeStep)
      acc += ws_colsum[b * E + e], n += ws_counts[b * E + e];
  for (int off = kFinalizeExperts; off < 32; off <<= 1)
    acc += __shfl_xor_sync(kFullMask, acc, off), n += __shfl_xor_sync(kFullMask, n, off);
  if (lane < kFinalizeExperts) warp_sum[warp][lane] = acc, warp_count[warp][lane] = n;
  __syncthreads();
  if (warp != 0 || lane >= kFinalizeExperts || e >= E) return;
  for (int w = 1; w < kFinalizeWarps; ++w) acc += warp_sum[w][lane], n += warp_count[w][lane];
  colsum[e] = acc;
  counts[e] = n;
}

// ------------------------------------------------------------------ backward
// Zeros this lane's share of a row, with 16-byte stores where the row's alignment allows (the bits of
// +0.0 are zero).
template <class Lanes, class S>
__device__ void zero_row(const Lanes& L, S* row, int64_t n) {
  constexpr int kPerVector = 16 / sizeof(S);
  if (n % kPerVector == 0 && aligned16(row)) {
    auto* vectors = reinterpret_cast<uint4*>(row);
    for (int64_t i = L.lane; i < n / kPerVector; i += L.nlanes) vectors[i] = make_uint4(0, 0, 0, 0);
  } else {
    for (int64_t e = L.lane; e < n; e += L.nlanes) row[e] = S(0);
  }
}

// W lanes a token (dispatch_bwd_lanes): with few experts a warp works on several tokens at once, so that
// the topk-long parts of the backward keep its lanes busy; rows of at most 32 experts take a thread each.
template <class In, int W, bool kAux, Fixed kFixed>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_bwd_kernel(RouteConfig config, ScoreFunction aux_f, const typename In::storage* __restrict__ x,
                     const int32_t* __restrict__ idx, const float* __restrict__ dw, AuxCotangent aux,
                     typename In::storage* __restrict__ dx, int64_t T) {
  const RouteConfig c = kernel_config<kFixed>(config);
  using R = RowGroupOf<W, kWarpsPerBlock>;
  using Lanes = std::conditional_t<W == 1, SerialLanes, GroupLanes<W>>;
  Lanes L;
  if constexpr (W > 1) L = R::lanes();
  const int64_t E = c.num_experts, k = c.topk;
  const bool sparse = !kAux && !(c.score_function == ScoreFunction::kSoftmax && c.use_pre_softmax);
  ScaledCounts dscale{};  // read once, not a row: the non-aux launch passes no loss cotangent to read
  if constexpr (kAux) dscale = aux.scores();
  for (int64_t t = R::first(); t < T; t += R::stride()) {
    const auto* xr = x + t * E;
    const int32_t* ir = idx + t * k;
    const float* dwr = dw + t * k;
    auto* dxr = dx + t * E;
    if constexpr (kAux) {
      route_aux_bwd_row<Lanes, In>(L, c, aux_f, xr, ir, dwr, dscale, dxr);
    } else if (sparse) {  // only the chosen experts get a gradient: zero the row, then write them
      zero_row(L, dxr, E);  // first: its stores need nothing the loads below bring
      const RouteRowGrad<In> r = route_row_grad<Lanes, In>(L, c, xr, ir, dwr);
      L.sync();
      for (int64_t j = L.lane; j < k; j += L.nlanes)
        if (r.chosen_valid(j)) dxr[ir[j]] = In::from_float(r.chosen(j));
    } else {
      route_bwd_row<Lanes, In>(L, c, xr, ir, dwr, dxr);
    }
    L.sync();
  }
}

// The fused aux backward for E <= 256 (8 lanes a token), each row kept in registers (R chunks a lane)
// between its two walks, so the logits are read from memory once; rows of whole, 16-byte aligned
// chunks. The aux score function is a template parameter: as a run-time value, the unrolled per-element
// code pays for all three functions (twice the time of route_bwd_kernel's loop, itself 14.2 µs for
// DeepSeek-V3 at T = 16384 against 6.4 for the routing backward alone).
template <class In, int R, ScoreFunction kAuxF, Fixed kFixed>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_aux_bwd_registers_kernel(RouteConfig config, const typename In::storage* __restrict__ x,
                                   const int32_t* __restrict__ idx, const float* __restrict__ dw, AuxCotangent aux,
                                   typename In::storage* __restrict__ dx, int64_t T) {
  const RouteConfig c = kernel_config<kFixed>(config);
  using Rows = RowGroupOf<8, kWarpsPerBlock>;
  const GroupLanes<8> L = Rows::lanes();
  const int64_t E = c.num_experts, k = c.topk;
  const ScaledCounts dscale = aux.scores();
  for (int64_t t = Rows::first(); t < T; t += Rows::stride()) {
    const RowInRegisters<GroupLanes<8>, In, R> row(L, x + t * E, E);
    route_aux_bwd_of<GroupLanes<8>, In>(L, c, kAuxF, row, x + t * E, idx + t * k, dw + t * k, dscale, dx + t * E,
                                        true);
    L.sync();
  }
}

// Expert e of the segment's row where load_set_rows stages it (and stage_set_rows its d logits).
template <class In>
__device__ typename In::storage* staged_element(uint4* rows, int segment, int e) {
  const int piece = e / 8;
  return reinterpret_cast<typename In::storage*>(rows + 32 * segment + 8 * (piece % 4) + piece / 4) + e % 8;
}

// The lanes' 32 values a lane (words as load_set_rows' pieces) staged in rows, for store_staged_rows.
__device__ void stage_set_rows(const SegmentLanes<8>& g, uint4* rows, const uint32_t (&words)[16]) {
  __syncwarp();  // the rows' reads are done
  uint4* mine = rows + 32 * g.segment() + g.sl;
#pragma unroll
  for (int j = 0; j < 4; ++j)
    mine[8 * j] = make_uint4(words[4 * j], words[4 * j + 1], words[4 * j + 2], words[4 * j + 3]);
}

// The staged rows written to the rows t0 + segment < T: 4 warp stores of 512 contiguous bytes.
template <class In>
__device__ void store_staged_rows(const SegmentLanes<8>& g, typename In::storage* out, int64_t t0, int64_t T,
                                  const uint4* rows) {
  __syncwarp();  // every lane's staging
  uint4* first = reinterpret_cast<uint4*>(out + t0 * 256) + loaded_piece(g.lane);
  const int last = int(min(T - 1 - t0, int64_t(3)));
#pragma unroll
  for (int r = 0; r < 4; ++r)
    if (r <= last) first[r * 32] = rows[32 * r + g.lane];
}

// d sigmoid / dx from the sigmoid s, s (1 - s), as one fma.
__device__ float sigmoid_grad(float s) { return fmaf(-s, s, s); }

// lo and hi converted to In's 16-bit type, in one word (one instruction).
template <class In>
__device__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<In, BF16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// route_with_aux_loss's backward for DeepSeek-V3's 16-bit rows, in route_deepseek_v3_kernel's layout (a warp a set
// of 4 tokens, lane sl of a token's 8 holding experts 32 sl to 32 sl + 31, rows loaded and stored whole through the
// warp's scratch): each score computed once and kept in registers between the row's sums and its d logits, the d
// scores staged in shared memory (route_aux_bwd_registers_kernel computes the scores twice and reads the d scores
// from global memory, an element at a time). The same math as route_aux_bwd_of: d logits = the clean scores'
// gradient of dscale, plus the routing gradient at the chosen experts (renormalised sigmoid weights, one a lane).
template <class In>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 4)
    route_aux_bwd_deepseek_v3_kernel(float scaling, const typename In::storage* __restrict__ x,
                                     const int32_t* __restrict__ idx, const float* __restrict__ dw, AuxCotangent aux,
                                     typename In::storage* __restrict__ dx, int64_t T) {
  constexpr int E = 256, K = 8;
  __shared__ __align__(16) float sg[E];  // dscale, laid out as route_deepseek_v3_kernel's bias
  __shared__ uint4 rows[kWarpsPerBlock][4 * 32];
  const int warp = threadIdx.x / 32;
  const SegmentLanes<8> g(threadIdx.x & 31);
  sg[bias_slot<8, 32>(threadIdx.x)] = aux.scores()(threadIdx.x);
  __syncthreads();
  const float4* g4 = reinterpret_cast<const float4*>(sg) + g.sl;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock * 4;
  for (int64_t t0 = (int64_t(blockIdx.x) * kWarpsPerBlock + warp) * 4; t0 < T; t0 += stride) {
    const int64_t t = t0 + g.segment();
    const bool valid = t < T;
    const int64_t r = valid ? t : T - 1;
    float s[32];
    load_set_rows<In>(g, x, t0, T, rows[warp], s);
    float sum = 0.0f, dot = 0.0f;
#pragma unroll
    for (int c4 = 0; c4 < 8; ++c4) {
      const float4 gv = g4[c4 * 8];
      const float gs[4] = {gv.x, gv.y, gv.z, gv.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float v = s[4 * c4 + j] = sigmoid(s[4 * c4 + j]);
        sum += v, dot = fmaf(gs[j], v, dot);
      }
    }
    const RenormGrad clean = renorm_grad(true, g.sum(sum), g.sum(dot));
    // The routing gradient of the token's chosen expert g.sl (as route_row_grad; an index out of range: NaN).
    const int e = idx[r * K + g.sl];
    const bool chosen = e >= 0 && e < E;
    const float v = sigmoid(chosen ? In::to_float(*staged_element<In>(rows[warp], g.segment(), e)) : NAN);
    const float hw = scaling * dw[r * K + g.sl];
    const RenormGrad route = renorm_grad(true, g.sum(v), g.sum(hw * v));
    uint32_t words[16];
#pragma unroll
    for (int c4 = 0; c4 < 8; ++c4) {
      const float4 gv = g4[c4 * 8];
      const float* q = s + 4 * c4;
      words[2 * c4] = pack2<In>(clean.h(gv.x) * sigmoid_grad(q[0]), clean.h(gv.y) * sigmoid_grad(q[1]));
      words[2 * c4 + 1] = pack2<In>(clean.h(gv.z) * sigmoid_grad(q[2]), clean.h(gv.w) * sigmoid_grad(q[3]));
    }
    stage_set_rows(g, rows[warp], words);
    // The chosen experts' d logits replace theirs in the staged rows, so that the rows' coalesced stores write them:
    // a second, scattered store an expert took T = 16384 11.0 -> 10.5 us (harness, H100, session 24).
    __syncwarp();  // every lane's staging, which the chosen experts' values overwrite
    if (chosen) {
      const float dv = sigmoid_grad(v);
      *staged_element<In>(rows[warp], g.segment(), e) =
          In::from_float(route.h(hw) * dv + clean.h(sg[bias_slot<8, 32>(e)]) * dv);
    }
    store_staged_rows<In>(g, dx, t0, T, rows[warp]);
  }
}

// ------------------------------------------------------------------- launch
// The smallest power of two >= E, for the thread path (E <= 32).
int thread_row_width(int64_t E) {
  int v = 1;
  while (v < E) v *= 2;
  return v;
}

// The segment path's layout for a config: S lanes of V experts per token, lpg lanes per group (0
// without groups); S == 0 where it does not apply (E > 1024, k > 32, groups that are not runs of
// whole lanes, or groups scored by more than their top 2). Segments of 8 lanes take the fewest
// instructions per token, but a warp then walks 32 experts per lane for its 4 tokens; below
// kWideTokens tokens the GPU is far from full, and a warp per token (8 experts per lane) finishes
// sooner.
constexpr int64_t kWideTokens = 4096;

struct SegmentLayout {
  int S = 0, V = 0, lpg = 0;
};

// S lanes of V experts a token, for rows of E <= 1024 experts: 8 lanes from wide_tokens tokens on.
SegmentLayout segment_lanes(int64_t E, int64_t tokens, int64_t wide_tokens) {
  const int S = E <= 256 && tokens >= wide_tokens ? 8 : 32;
  int V = 4;
  while (S * V < E) V *= 2;
  return {S, V, 0};
}

SegmentLayout segment_layout(const RouteConfig& c, int64_t aux_topk, int64_t tokens, int64_t wide_tokens) {
  const int64_t E = c.num_experts;
  if (E > 1024 || c.topk > kMaxSegmentTopk || aux_topk > kMaxSegmentTopk) return {};
  SegmentLayout layout = segment_lanes(E, tokens, wide_tokens);
  if (c.num_groups == 0) return layout;
  const int64_t gs = c.group_size(), lpg = gs / layout.V;
  if (E != layout.S * layout.V || gs % layout.V || (lpg & (lpg - 1)) || c.group_score_topn > 2) return {};
  layout.lpg = int(lpg);
  return layout;
}

// One forward launch: the kernel, its grid (fixed by the workspace for the aux variant, whose
// per-block partials must not depend on the device) and its stream.
struct Launch {
  cudaStream_t stream;
  DeviceLimits dev;
  const AuxArgs* aux;   // null: plain routing
  int64_t aux_blocks;   // the workspace's block count
  mutable unsigned launched = 0;  // the grid of the last launch: the aux workspace rows written

  // Blocks handling tokens_per_block tokens each, capped so blocks stay resident and loop. The aux
  // variant's cap is the workspace's block count, which depends on E alone: its block-ordered sums
  // then depend on the shapes only, never on the device.
  unsigned grid(int64_t tokens, int tokens_per_block) const {
    const int64_t blocks = (tokens + tokens_per_block - 1) / tokens_per_block;
    launched = unsigned(std::min<int64_t>(blocks, aux ? aux_blocks : int64_t(dev.sm_count) * 16));
    return launched;
  }
};

template <class In, int V, bool kAux>
void launch_thread(const Launch& l, const RouteConfig& c, const void* x, BiasLoader bias, int64_t T, float* w,
                   int32_t* idx) {
  route_thread_kernel<In, V, kAux><<<l.grid(T, kWarpsPerBlock * 32), kWarpsPerBlock * 32, 0, l.stream>>>(
      c, static_cast<const typename In::storage*>(x), bias, T, w, idx, kAux ? *l.aux : AuxArgs{});
}

// Readies a segment-path kernel for a launch with `smem` bytes of dynamic shared memory (past 48 KB a kernel
// must opt in, on each device; a failure shows in the launch, which is reported), and returns how many of
// its blocks an SM holds at once, queried once per kernel: grids of at most one resident wave pay the
// blocks' setup once per block slot, and give every warp about as many tokens as the others.
template <auto kKernel>
int resident_segment_blocks(size_t smem) {
  if (smem > 48 * 1024) cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  static const int resident = [smem] {
    int n = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kWarpsPerBlock * 32, smem);
    return n > 0 ? n : 1;
  }();
  return resident;
}

template <class In, int S, int V, bool kAux, Fixed kFixed>
void launch_segment(const Launch& l, const RouteConfig& c, const void* x, BiasLoader bias, int64_t T, int lpg,
                    float* w, int32_t* idx) {
  constexpr size_t smem = segment_smem_bytes<S, V, kAux>();
  static_assert(smem <= 112 * 1024, "the segment path needs two blocks an SM at least");
  constexpr int kTokensPerBlock = kWarpsPerBlock * 32 / S;
  // DeepSeek-V3's 16-bit rows at 8 lanes a token take the lean kernel, a block per 32 tokens, where the others keep
  // one resident wave.
  if constexpr (kFixed == Fixed::kDeepSeekV3 && !kAux && S == 8 && sizeof(typename In::storage) == 2) {
    constexpr auto kernel = route_deepseek_v3_kernel<In>;
    constexpr size_t bytes =
        kDeepSeekV3Config.num_experts * sizeof(float) + kWarpsPerBlock * sizeof(DeepSeekV3WarpMemory);
    static_assert(bytes <= 48 * 1024, "past 48 KB a kernel must opt in");
    const unsigned grid = unsigned(std::min<int64_t>((T + kTokensPerBlock - 1) / kTokensPerBlock, INT_MAX));
    kernel<<<grid, kWarpsPerBlock * 32, bytes, l.stream>>>(c.scaling_factor, static_cast<const typename In::storage*>(x),
                                                           bias, T, w, idx);
  } else {
    constexpr auto kernel = route_segment_kernel<In, S, V, kAux, kFixed>;
    const int resident = resident_segment_blocks<kernel>(smem);
    // At most one resident wave; the aux variant's grid is capped by its workspace's block count instead.
    unsigned grid = l.grid(T, kTokensPerBlock);
    if (!kAux) grid = std::min(grid, unsigned(resident * l.dev.sm_count));
    kernel<<<grid, kWarpsPerBlock * 32, smem, l.stream>>>(c, static_cast<const typename In::storage*>(x), bias, T, lpg,
                                                          w, idx, kAux ? *l.aux : AuxArgs{});
  }
}

// Calls f.template operator()<V>() for V in {1, 2, 4, ..., 32}.
template <class F>
void dispatch_row_width(int V, F&& f) {
  switch (V) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 4: f.template operator()<4>(); break;
    case 8: f.template operator()<8>(); break;
    case 16: f.template operator()<16>(); break;
    default: f.template operator()<32>(); break;
  }
}

// Calls f.template operator()<S, V>() for the layouts segment_layout returns.
template <class F>
void dispatch_segment_layout(const SegmentLayout& s, F&& f) {
  if (s.S == 32) {
    switch (s.V) {
      case 4: f.template operator()<32, 4>(); break;
      case 8: f.template operator()<32, 8>(); break;
      case 16: f.template operator()<32, 16>(); break;
      default: f.template operator()<32, 32>(); break;
    }
    return;
  }
  switch (s.V) {
    case 4: f.template operator()<8, 4>(); break;
    case 8: f.template operator()<8, 8>(); break;
    case 16: f.template operator()<8, 16>(); break;
    default: f.template operator()<8, 32>(); break;
  }
}

// Whether c is d up to the scaling factor (and use_pre_softmax, which only softmax reads).
bool same_config(const RouteConfig& c, const RouteConfig& d) {
  return c.num_experts == d.num_experts && c.topk == d.topk && c.score_function == d.score_function &&
         (c.use_pre_softmax == d.use_pre_softmax || c.score_function != ScoreFunction::kSoftmax) &&
         c.num_groups == d.num_groups && c.group_topk == d.group_topk &&
         c.group_score_topn == d.group_score_topn && c.renormalize == d.renormalize;
}

bool same_aux_config(const AuxConfig* a, const AuxConfig& d) {
  return !a || (a->topk == d.topk && a->score_function == d.score_function);
}

// The compiled-in config that c (and the aux statistics, where given) are, up to the scaling factor.
Fixed fixed_config(const RouteConfig& c, const AuxConfig* aux) {
  for (const Fixed f : kFixedConfigs)
    if (same_config(c, kFixedRoute[int(f)]) && same_aux_config(aux, kFixedAux[int(f)])) return f;
  return Fixed::kNone;
}

// From how many tokens on the segment kernels take 8 lanes a token. DeepSeek-V3's routing kernel keeps a warp a
// token up to 48 tokens an SM (6336 on an H100, one resident wave of its 16-bit kernel): at 8 lanes its rows of 32
// experts a lane make a long chain, which few warps an SM cannot hide. H100, 8 against 32 lanes (RESULTS.md,
// session 15): bf16 T = 4096 5.63 / 4.93 us, 6144 6.95 / 6.24, 7168 7.12 / 7.27; f32 T = 4096 6.32 / 5.54, 6144
// 8.33 / 7.20, 8192 8.62 / 8.78. Softmax over 128 experts is faster at 8 lanes from 4096 tokens (3.55 against
// 3.98 us), and so is route_with_aux_loss's DeepSeek-V3 kernel (16.0 against 17.1): those keep kWideTokens.
constexpr int64_t kDeepSeekV3TokensPerSM = 48;

int64_t wide_tokens(const DeviceLimits& dev, Fixed fixed, bool aux) {
  if (aux || fixed != Fixed::kDeepSeekV3) return kWideTokens;
  return std::max(kWideTokens, kDeepSeekV3TokensPerSM * dev.sm_count + 1);
}

template <class In, bool kAux>
ffi::Error route_fwd_typed(const Launch& l, const RouteConfig& c, const void* x, BiasLoader bias, int64_t T, float* w,
                           int32_t* idx) {
  if (c.num_experts <= 32 && c.num_groups == 0) {
    dispatch_row_width(thread_row_width(c.num_experts),
                       [&]<int V>() { launch_thread<In, V, kAux>(l, c, x, bias, T, w, idx); });
    return launch_status("route forward (thread per token)");
  }
  const Fixed fixed = fixed_config(c, kAux ? &l.aux->cfg : nullptr);
  const SegmentLayout layout = segment_layout(c, kAux ? l.aux->cfg.topk : 0, T, wide_tokens(l.dev, fixed, kAux));
  if (layout.S) {
    dispatch_segment_layout(layout, [&]<int S, int V>() {
      if constexpr (S * V == kDeepSeekV3Config.num_experts)
        if (fixed == Fixed::kDeepSeekV3)
          return launch_segment<In, S, V, kAux, Fixed::kDeepSeekV3>(l, c, x, bias, T, layout.lpg, w, idx);
      if constexpr (S * V == kSoftmax128Top8Config.num_experts)
        if (fixed == Fixed::kSoftmax128Top8)
          return launch_segment<In, S, V, kAux, Fixed::kSoftmax128Top8>(l, c, x, bias, T, layout.lpg, w, idx);
      launch_segment<In, S, V, kAux, Fixed::kNone>(l, c, x, bias, T, layout.lpg, w, idx);
    });
    return launch_status("route forward (segment per token)");
  }
  const size_t per_warp = (2 * c.num_experts + c.num_groups + (kAux ? 2 * c.num_experts : 0)) * sizeof(uint32_t);
  if (per_warp > size_t(l.dev.smem_optin))
    return invalid("num_experts=" + std::to_string(c.num_experts) + " exceeds the shared memory of this GPU");
  const int warps = int(std::min<size_t>(4, l.dev.smem_optin / per_warp));
  const size_t bytes = per_warp * warps;
  cudaFuncSetAttribute(route_generic_kernel<In, kAux>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  route_generic_kernel<In, kAux><<<l.grid(T, warps), warps * 32, bytes, l.stream>>>(
      c, static_cast<const typename In::storage*>(x), bias, T, warps, w, idx, kAux ? *l.aux : AuxArgs{});
  return launch_status("route forward (generic path)");
}

// ------------------------------------------------------------------ handlers
ffi::Error route_fwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer logits, ffi::AnyBuffer bias,
                     ffi::Result<ffi::AnyBuffer> weights, ffi::Result<ffi::AnyBuffer> indices, int64_t topk,
                     int64_t score_function, bool pre, int64_t num_groups, int64_t group_topk,
                     int64_t group_score_topn, bool renormalize, float scaling_factor) {
  auto checked = check_route_fwd(logits, bias, *weights, *indices,
                                 make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                   group_score_topn, renormalize, scaling_factor));
  if (checked.has_error()) return checked.error();
  const RouteFwdBuffers& b = *checked;
  if (b.tokens == 0) return ffi::Error::Success();
  const Launch l{stream, device_limits(device), nullptr, 0};
  return dispatch_float(b.logits_dtype, [&]<class In>() {
    return route_fwd_typed<In, false>(l, b.config, logits.untyped_data(), b.bias, b.tokens, b.weights, b.indices);
  });
}

// route_with_aux_loss in DeepSeek-V3's config on 16-bit rows at 8 lanes a token takes route_deepseek_v3_aux_kernel,
// which writes the statistics itself (no aux_finalize_kernel).
bool takes_deepseek_v3_aux_kernel(const RouteFwdBuffers& b, const AuxConfig& a) {
  return fixed_config(b.config, &a) == Fixed::kDeepSeekV3 && b.logits_dtype != Dtype::kF32 &&
         b.tokens >= kWideTokens;
}

// blocks: the workspace's rows, which cap the grid as the other aux kernels' (the column sums' rounding then depends
// on T alone); the workspace holds the kernel's totals, zeroed here.
ffi::Error launch_deepseek_v3_aux(cudaStream_t stream, const RouteFwdBuffers& b, const void* logits, int64_t blocks,
                                  void* workspace, float c_coeff, AuxOutputs out) {
  if (size_t(blocks) * kDeepSeekV3Config.num_experts * sizeof(float) < sizeof(DeepSeekV3AuxTotals))
    return invalid("the aux workspace is too small for route_with_aux_loss's DeepSeek-V3 kernel");
  if (cudaMemsetAsync(workspace, 0, sizeof(DeepSeekV3AuxTotals), stream) != cudaSuccess)
    return launch_status("route_with_aux_loss forward (zeroing the totals)");
  constexpr size_t bytes = (2 * kDeepSeekV3Config.num_experts + 32) * sizeof(float) +
                           kWarpsPerBlock * sizeof(DeepSeekV3WarpMemory);
  static_assert(bytes <= 48 * 1024, "past 48 KB a kernel must opt in");
  const unsigned grid = unsigned(std::min<int64_t>((b.tokens + 31) / 32, blocks));
  return dispatch_float(b.logits_dtype, [&]<class In>() {
    if constexpr (sizeof(typename In::storage) == 2)
      route_deepseek_v3_aux_kernel<In><<<grid, kWarpsPerBlock * 32, bytes, stream>>>(
          b.config.scaling_factor, static_cast<const typename In::storage*>(logits), b.bias, b.tokens, b.weights,
          b.indices, static_cast<DeepSeekV3AuxTotals*>(workspace), c_coeff, out);
    return launch_status("route_with_aux_loss forward (DeepSeek-V3)");
  });
}

ffi::Error route_aux_fwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer logits, ffi::AnyBuffer bias,
                         ffi::Result<ffi::AnyBuffer> weights, ffi::Result<ffi::AnyBuffer> indices,
                         ffi::Result<ffi::AnyBuffer> colsum, ffi::Result<ffi::AnyBuffer> counts,
                         ffi::Result<ffi::AnyBuffer> loss, ffi::Result<ffi::AnyBuffer> ws_colsum,
                         ffi::Result<ffi::AnyBuffer> ws_counts, int64_t topk, int64_t score_function, bool pre,
                         int64_t num_groups, int64_t group_topk, int64_t group_score_topn, bool renormalize,
                         float scaling_factor, int64_t aux_topk, int64_t aux_score_function, float c_coeff) {
  auto checked = check_route_fwd(logits, bias, *weights, *indices,
                                 make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                   group_score_topn, renormalize, scaling_factor));
  if (checked.has_error()) return checked.error();
  const RouteFwdBuffers& b = *checked;
  auto aux_checked = check_route_aux_outputs(b.config.num_experts, aux_topk, aux_score_function, *colsum, *counts,
                                             *loss, *ws_colsum, *ws_counts);
  if (aux_checked.has_error()) return aux_checked.error();
  const int64_t E = b.config.num_experts, blocks = *aux_checked;
  float* cs = colsum->typed_data<float>();
  int32_t* cn = counts->typed_data<int32_t>();
  float* out_loss = loss->typed_data<float>();
  if (b.tokens == 0 || blocks == 0) {
    cudaMemsetAsync(cs, 0, E * sizeof(float), stream);
    cudaMemsetAsync(cn, 0, E * sizeof(int32_t), stream);
    cudaMemsetAsync(out_loss, 0, sizeof(float), stream);
    return launch_status("route_with_aux_loss forward (no tokens)");
  }
  const AuxConfig aux_cfg{aux_topk, ScoreFunction(aux_score_function)};
  if (takes_deepseek_v3_aux_kernel(b, aux_cfg))
    return launch_deepseek_v3_aux(stream, b, logits.untyped_data(), blocks, ws_colsum->untyped_data(), c_coeff,
                                  {cs, cn, out_loss});
  const AuxArgs aux{aux_cfg,
                    ws_colsum->typed_data<float>(),
                    ws_counts->typed_data<int32_t>()};
  const Launch l{stream, device_limits(device), &aux, blocks};
  const ffi::Error routed = dispatch_float(b.logits_dtype, [&]<class In>() {
    return route_fwd_typed<In, true>(l, b.config, logits.untyped_data(), b.bias, b.tokens, b.weights, b.indices);
  });
  if (routed.failure()) return routed;
  const unsigned finalize_blocks = unsigned((E + kFinalizeExperts - 1) / kFinalizeExperts);
  aux_finalize_kernel<<<finalize_blocks, kFinalizeWarps * 32, 0, stream>>>(aux.ws_colsum, aux.ws_counts, l.launched,
                                                                          E, cs, cn);
  aux_loss_of_statistics_kernel<<<1, kWarpsPerBlock * 32, 0, stream>>>(c_coeff, E, {cs, cn, out_loss});
  return launch_status("route_with_aux_loss forward (statistics)");
}

// The backward kernels take at most this many blocks an SM; their blocks loop over tokens past that.
constexpr int kBwdBlocksPerSM = 16;

// Launches route_aux_bwd_registers_kernel for R = register_chunks(...) in {2, 4, 8} (false otherwise:
// the caller launches route_bwd_kernel).
template <class In>
bool launch_aux_bwd_registers(cudaStream_t stream, const DeviceLimits& dev, const RouteBwdBuffers& b, int R,
                              ScoreFunction aux_f, AuxCotangent aux) {
  const unsigned grid = RowGroupOf<8, kWarpsPerBlock>::grid(b.tokens, dev.sm_count, kBwdBlocksPerSM);
  const auto launch = [&]<int kR, ScoreFunction kF>() {
    using S = typename In::storage;
    auto kernel = route_aux_bwd_registers_kernel<In, kR, kF, Fixed::kNone>;
    // DeepSeek-V3 rows (256 experts: kR chunks of 16 bytes a lane) with sigmoid aux statistics: its config
    // folded in (kDeepSeekV3Config), T = 16384 bf16 11.1 -> 9.8 us, f32 14.2 -> 12.8 (H100).
    if constexpr (kF == ScoreFunction::kSigmoid && kR * 16 * 8 == kDeepSeekV3Config.num_experts * sizeof(S))
      if (fixed_config(b.config, nullptr) == Fixed::kDeepSeekV3)
        kernel = route_aux_bwd_registers_kernel<In, kR, kF, Fixed::kDeepSeekV3>;
    kernel<<<grid, kWarpsPerBlock * 32, 0, stream>>>(b.config, static_cast<const S*>(b.logits), b.indices,
                                                     b.dweights, aux, static_cast<S*>(b.dlogits), b.tokens);
  };
  const auto by_function = [&]<int kR>() {
    with_score_function(aux_f, [&]<ScoreFunction kF>() { launch.template operator()<kR, kF>(); });
  };
  switch (R) {
    case 2: by_function.template operator()<2>(); return true;
    case 4: by_function.template operator()<4>(); return true;
    case 8: by_function.template operator()<8>(); return true;
    default: return false;
  }
}

// Lanes a token of the backward: one for rows of at most 32 experts, 8 up to 256, else a warp.
template <class F>
void dispatch_bwd_lanes(int64_t E, F&& f) {
  if (E <= 32) f.template operator()<1>();
  else if (E <= 256) f.template operator()<8>();
  else f.template operator()<32>();
}

template <bool kAux>
ffi::Error launch_route_bwd(cudaStream_t stream, int32_t device, const RouteBwdBuffers& b, ScoreFunction aux_f,
                            AuxCotangent aux) {
  if (b.tokens == 0) return ffi::Error::Success();
  const DeviceLimits dev = device_limits(device);
  const int64_t E = b.config.num_experts;
  return dispatch_float(b.logits_dtype, [&]<class In>() {
    using S = typename In::storage;
    const int64_t row_bytes = E * int64_t(sizeof(S));
    const bool aligned = row_bytes % 16 == 0 && aligned16(b.logits) && aligned16(b.dlogits);
    dispatch_bwd_lanes(E, [&]<int W>() {
      if constexpr (W == 8 && kAux) {
        if constexpr (sizeof(S) == 2) {
          if (aligned && fixed_config(b.config, nullptr) == Fixed::kDeepSeekV3 && aux_f == ScoreFunction::kSigmoid) {
            const unsigned grid = unsigned(std::min<int64_t>((b.tokens + 31) / 32, INT_MAX));
            route_aux_bwd_deepseek_v3_kernel<In><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
                b.config.scaling_factor, static_cast<const S*>(b.logits), b.indices, b.dweights, aux,
                static_cast<S*>(b.dlogits), b.tokens);
            return;
          }
        }
        if (aligned && launch_aux_bwd_registers<In>(stream, dev, b, register_chunks(row_bytes / 16, W), aux_f, aux))
          return;
      }
      const unsigned grid = RowGroupOf<W, kWarpsPerBlock>::grid(b.tokens, dev.sm_count, kBwdBlocksPerSM);
      auto kernel = route_bwd_kernel<In, W, kAux, Fixed::kNone>;
      // The compiled-in configs (DeepSeek-V3: 63 -> 29 registers, T = 16384 bf16 6.0 -> 4.8 us, H100).
      if constexpr (W == 8 && !kAux) {
        const Fixed fixed = fixed_config(b.config, nullptr);
        if (fixed == Fixed::kDeepSeekV3) kernel = route_bwd_kernel<In, W, kAux, Fixed::kDeepSeekV3>;
        if (fixed == Fixed::kSoftmax128Top8) kernel = route_bwd_kernel<In, W, kAux, Fixed::kSoftmax128Top8>;
      }
      kernel<<<grid, kWarpsPerBlock * 32, 0, stream>>>(b.config, aux_f, static_cast<const S*>(b.logits), b.indices,
                                                       b.dweights, aux, static_cast<S*>(b.dlogits), b.tokens);
    });
    return launch_status("route backward");
  });
}

ffi::Error route_bwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer logits, ffi::AnyBuffer indices,
                     ffi::AnyBuffer dweights, ffi::Result<ffi::AnyBuffer> dlogits, int64_t topk,
                     int64_t score_function, bool pre, int64_t num_groups, int64_t group_topk,
                     int64_t group_score_topn, bool renormalize, float scaling_factor) {
  auto checked = check_route_bwd(logits, indices, dweights, *dlogits,
                                 make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                   group_score_topn, renormalize, scaling_factor));
  if (checked.has_error()) return checked.error();
  return launch_route_bwd<false>(stream, device, *checked, ScoreFunction::kSoftmax, AuxCotangent{});
}

ffi::Error route_aux_bwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer logits, ffi::AnyBuffer indices,
                         ffi::AnyBuffer dweights, ffi::AnyBuffer counts, ffi::AnyBuffer dloss,
                         ffi::Result<ffi::AnyBuffer> dlogits, int64_t topk, int64_t score_function, bool pre,
                         int64_t num_groups, int64_t group_topk, int64_t group_score_topn, bool renormalize,
                         float scaling_factor, int64_t aux_score_function, float c_coeff) {
  auto checked = check_route_bwd(logits, indices, dweights, *dlogits,
                                 make_route_config(0, topk, score_function, pre, num_groups, group_topk,
                                                   group_score_topn, renormalize, scaling_factor));
  if (checked.has_error()) return checked.error();
  if (auto err = check_aux_cotangent(checked->config.num_experts, aux_score_function, counts, dloss)) return *err;
  return launch_route_bwd<true>(stream, device, *checked, ScoreFunction(aux_score_function),
                                AuxCotangent{counts.typed_data<int32_t>(), dloss.typed_data<float>(), c_coeff});
}

}  // namespace

// Where it beat the row kernel on an H100 (T = 16384, RESULTS.md): E <= 256 at k = 8 and 32, E = 1024 at
// k = 8. At E = 1024, k = 32 it was slower (483 against 451 µs, before the lanes were interleaved), the
// threshold's k rounds of shuffles costing more than the row kernel's k arg-max passes.
bool aux_scores_on_segments(int64_t experts, int64_t topk) {
  return experts <= 256 ? topk <= kMaxSegmentTopk : experts <= 1024 && topk <= 8;
}

ffi::Error aux_scores_segments(cudaStream_t stream, int32_t device, Dtype dtype, ScoreFunction f, int64_t topk,
                               const void* logits, int64_t T, int64_t E, float* scores, int* counts) {
  const int sm_count = device_limits(device).sm_count;
  return dispatch_float(dtype, [&]<class In>() {
    dispatch_segment_layout(segment_lanes(E, T, kWideTokens), [&]<int S, int V>() {
      constexpr size_t smem = segment_smem_bytes<S, V, false>();
      constexpr auto kernel = aux_scores_segment_kernel<In, S, V>;
      const int resident = resident_segment_blocks<kernel>(smem);  // one resident wave at most
      const unsigned grid = RowGroupOf<S, kWarpsPerBlock>::grid(T, sm_count, resident);  // S lanes a token
      kernel<<<grid, kWarpsPerBlock * 32, smem, stream>>>(
          f, int(topk), static_cast<const typename In::storage*>(logits), T, int(E), scores, counts);
    });
    return launch_status("aux scores (segment per token)");
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_fwd_cuda, route_fwd,
                              bind_route_attrs(bind_stream_and_device()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_bwd_cuda, route_bwd,
                              bind_route_attrs(bind_stream_and_device()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_aux_fwd_cuda, route_aux_fwd,
                              bind_route_attrs(bind_stream_and_device()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>())
                                  .Attr<int64_t>("aux_topk")
                                  .Attr<int64_t>("aux_score_function")
                                  .Attr<float>("c_coeff"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_route_aux_bwd_cuda, route_aux_bwd,
                              bind_route_attrs(bind_stream_and_device()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Arg<ffi::AnyBuffer>()
                                                   .Ret<ffi::AnyBuffer>())
                                  .Attr<int64_t>("aux_score_function")
                                  .Attr<float>("c_coeff"),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_moe
