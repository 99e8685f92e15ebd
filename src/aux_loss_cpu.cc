// CPU handlers of the aux-loss primitives: the shared row algorithms with one lane, and the loss sums
// replayed in the CUDA kernels' order (aux_loss_row.h, "deterministic sums").
#include <algorithm>
#include <vector>

#include "aux_loss_ffi.h"
#include "handlers.h"

namespace jax_moe {
namespace {

// Stage 2 into buf = [coeff, coeff * total] and the loss (buf[1] in the loss dtype); the partials stay in
// the workspace.
void finish_loss(const float* partials, int64_t blocks, float coeff, float* buf, void* loss, Dtype loss_dtype) {
  buf[0] = coeff;
  buf[1] = coeff * sum_partials(partials, blocks);
  store_float(loss, 0, buf[1], loss_dtype);
}

ffi::Error aux_scores_fwd(ffi::AnyBuffer logits, ffi::Result<ffi::AnyBuffer> scores, ffi::Result<ffi::AnyBuffer> counts,
                          int64_t topk, int64_t score_function) {
  auto shapes = check_aux_scores_fwd(logits, *scores, *counts, topk, score_function);
  if (shapes.has_error()) return shapes.error();
  const RowShapes s = *shapes;
  int32_t* count = counts->typed_data<int32_t>();
  std::fill(count, count + s.experts, 0);
  float* out = scores->typed_data<float>();
  return dispatch_float(s.dtype, [&]<class In>() {
    const auto* x = static_cast<const typename In::storage*>(logits.untyped_data());
    for (int64_t t = 0; t < s.tokens; ++t)
      aux_scores_row<SerialLanes, In>(SerialLanes{}, s.f, topk, x + t * s.experts, s.experts, out + t * s.experts,
                                      nullptr, [&](int64_t e) { ++count[e]; });
    return ffi::Error::Success();
  });
}

ffi::Error aux_scores_bwd(ffi::AnyBuffer logits, ffi::AnyBuffer dscores, ffi::Result<ffi::AnyBuffer> dlogits,
                          int64_t score_function) {
  auto shapes = check_aux_scores_bwd(logits, dscores, *dlogits, score_function);
  if (shapes.has_error()) return shapes.error();
  const RowShapes s = *shapes;
  const float* g = dscores.typed_data<float>();
  return dispatch_float(s.dtype, [&]<class In>() {
    using S = typename In::storage;
    const auto* x = static_cast<const S*>(logits.untyped_data());
    auto* dx = static_cast<S*>(dlogits->untyped_data());
    for (int64_t t = 0; t < s.tokens; ++t) {
      const float* gt = g + t * s.experts;
      clean_scores_bwd_row<SerialLanes, In>(SerialLanes{}, s.f, x + t * s.experts, s.experts,
                                            [&](int64_t e) { return gt[e]; }, dx + t * s.experts);
    }
    return ffi::Error::Success();
  });
}

ffi::Error aux_loss_fwd(ffi::AnyBuffer probs, ffi::AnyBuffer tpe, ffi::Result<ffi::AnyBuffer> loss,
                        ffi::Result<ffi::AnyBuffer> buf, ffi::Result<ffi::AnyBuffer> workspace, float coeff) {
  auto shapes = check_aux_loss_fwd(probs, tpe, *loss, *buf, *workspace);
  if (shapes.has_error()) return shapes.error();
  const ProbsShapes s = *shapes;
  const Counts w = s.tpe;
  float* partials = workspace->typed_data<float>();
  return dispatch_float(s.dtype, [&]<class In>() {
    const auto* p = static_cast<const typename In::storage*>(probs.untyped_data());
    // Thread slot of vector v: v % slots, vectors in increasing order (aux_loss_row.h).
    const int64_t slots = s.blocks * kSumThreads, V = s.vec;
    std::vector<float> acc(size_t(slots), 0.0f);
    int64_t slot = 0, col = 0;
    for (int64_t v = 0; v < s.vectors; ++v) {
      float a = acc[slot];
      for (int64_t j = 0; j < V; ++j) a = add_product(a, In::to_float(p[v * V + j]), w(col + j));
      acc[slot] = a;
      if (++slot == slots) slot = 0;
      if ((col += V) == s.cols) col = 0;
    }
    for (int64_t b = 0; b < s.blocks; ++b) partials[b] = block_sum_of_slots(&acc[b * kSumThreads], 32);
    finish_loss(partials, s.blocks, coeff, buf->typed_data<float>(), loss->untyped_data(), s.loss_dtype);
    return ffi::Error::Success();
  });
}

// d probs: the row (buf[0] · g) · tpe[c] in probs' dtype, then copies of it on every other token.
ffi::Error aux_loss_bwd(ffi::AnyBuffer buf, ffi::AnyBuffer tpe, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dprobs) {
  auto shapes = check_aux_loss_bwd(buf, tpe, g, *dprobs);
  if (shapes.has_error()) return shapes.error();
  const ColumnShapes s = *shapes;
  if (s.rows == 0) return ffi::Error::Success();
  const ScaledCounts row{s.tpe, buf.typed_data<float>()[0] * g.typed_data<float>()[0]};
  return dispatch_float(s.dtype, [&]<class In>() {
    auto* out = static_cast<typename In::storage*>(dprobs->untyped_data());
    for (int64_t c = 0; c < s.cols; ++c) out[c] = In::from_float(row(c));
    for (int64_t t = 1; t < s.rows; ++t) std::copy(out, out + s.cols, out + t * s.cols);
    return ffi::Error::Success();
  });
}

ffi::Error aux_logits_fwd(ffi::AnyBuffer logits, ffi::AnyBuffer tpe, ffi::Result<ffi::AnyBuffer> loss,
                          ffi::Result<ffi::AnyBuffer> buf, ffi::Result<ffi::AnyBuffer> workspace,
                          int64_t score_function, float coeff) {
  auto shapes = check_aux_logits_fwd(logits, tpe, *loss, *buf, *workspace, score_function);
  if (shapes.has_error()) return shapes.error();
  const RowShapes s = *shapes;
  const Counts w = s.tpe;
  float* partials = workspace->typed_data<float>();
  return dispatch_float(s.dtype, [&]<class In>() {
    const auto* x = static_cast<const typename In::storage*>(logits.untyped_data());
    // Row slot (a group of lanes on CUDA) of token t: t % slots, tokens in increasing order.
    const int per_warp = 32 / row_lanes(s.experts, sizeof(typename In::storage));
    const int64_t blocks = sum_blocks(s.tokens, kSumWarps * per_warp), slots = blocks * kSumWarps * per_warp;
    std::vector<float> acc(size_t(slots), 0.0f);
    for (int64_t t = 0; t < s.tokens; ++t)
      acc[t % slots] = acc[t % slots] + clean_dot<SerialLanes, In>(SerialLanes{}, s.f, x + t * s.experts, s.experts,
                                                                   w);
    for (int64_t b = 0; b < blocks; ++b)
      partials[b] = block_sum_of_slots(&acc[b * kSumWarps * per_warp], per_warp);
    finish_loss(partials, blocks, coeff, buf->typed_data<float>(), loss->untyped_data(), Dtype::kF32);
    return ffi::Error::Success();
  });
}

ffi::Error aux_logits_bwd(ffi::AnyBuffer logits, ffi::AnyBuffer tpe, ffi::AnyBuffer buf, ffi::AnyBuffer g,
                          ffi::Result<ffi::AnyBuffer> dlogits, int64_t score_function) {
  auto shapes = check_aux_logits_bwd(logits, tpe, buf, g, *dlogits, score_function);
  if (shapes.has_error()) return shapes.error();
  const RowShapes s = *shapes;
  const ScaledCounts dscores{s.tpe, buf.typed_data<float>()[0] * g.typed_data<float>()[0]};
  return dispatch_float(s.dtype, [&]<class In>() {
    using S = typename In::storage;
    const auto* x = static_cast<const S*>(logits.untyped_data());
    auto* dx = static_cast<S*>(dlogits->untyped_data());
    for (int64_t t = 0; t < s.tokens; ++t)
      clean_scores_bwd_row<SerialLanes, In>(SerialLanes{}, s.f, x + t * s.experts, s.experts, dscores,
                                            dx + t * s.experts);
    return ffi::Error::Success();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_aux_scores_fwd_cpu, aux_scores_fwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("topk")
                                  .Attr<int64_t>("score_function"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_aux_scores_bwd_cpu, aux_scores_bwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("score_function"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_aux_loss_fwd_cpu, aux_loss_fwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("coeff"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_aux_loss_bwd_cpu, aux_loss_bwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_aux_logits_fwd_cpu, aux_logits_fwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("score_function")
                                  .Attr<float>("coeff"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_aux_logits_bwd_cpu, aux_logits_bwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("score_function"));

}  // namespace jax_moe
