// Buffer checks of the aux-loss FFI handlers, shared by the CPU and CUDA builds: a call with
// inconsistent buffers returns an FFI error before any kernel reads or writes them.
#pragma once

#include <optional>
#include <string>

#include "aux_loss_row.h"
#include "ffi_helpers.h"

namespace jax_moe {

// Logits-like buffers [..., E]: all leading dims are tokens; tpe when the call has tokens_per_expert.
struct RowShapes {
  Dtype dtype;
  ScoreFunction f;
  int64_t tokens;
  int64_t experts;
  Counts tpe = {nullptr, false};
};

// probs [T, C] read as `vectors` vectors of `vec` elements by `blocks` stage-1 blocks; the loss is
// written in loss_dtype.
struct ProbsShapes {
  Dtype dtype;
  Dtype loss_dtype;
  Counts tpe;
  int64_t rows;
  int64_t cols;
  int64_t vec;
  int64_t vectors;
  int64_t blocks;
};

// A [T, C] array of the probs loss (probs, or d probs: C_coeff · d loss · tpe[c] on every row) and the
// counts of its columns, tpe [C].
struct ColumnShapes {
  Dtype dtype;
  Counts tpe;
  int64_t rows;
  int64_t cols;
};

namespace aux_detail {

inline ffi::Unexpected<ffi::Error> fail(const std::string& what) { return ffi::Unexpected<ffi::Error>(invalid(what)); }

inline bool same_dims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// A float32 vector of n elements.
inline bool f32_vector(const ffi::AnyBuffer& b, int64_t n) { return is_vector(b, ffi::DataType::F32, n); }

// The cotangent of the loss: one float32.
inline bool f32_scalar(const ffi::AnyBuffer& b) {
  return b.element_type() == ffi::DataType::F32 && b.element_count() == 1;
}

// What is wrong with a backward's residual buffer or its loss cotangent, or null.
inline const char* residuals_error(const ffi::AnyBuffer& buf, const ffi::AnyBuffer& g) {
  if (!f32_vector(buf, 2)) return "the aux loss buffer must be float32 [2]";
  if (!f32_scalar(g)) return "the aux loss cotangent must be a float32 scalar";
  return nullptr;
}

inline ffi::ErrorOr<RowShapes> check_rows(const ffi::AnyBuffer& logits, int64_t score_function) {
  const auto dims = logits.dimensions();
  if (dims.size() == 0) return fail("logits must have rank >= 1");
  const auto dtype = float_dtype(logits.element_type());
  if (!dtype) return fail("logits must be float32, bfloat16 or float16");
  // Counts are summed in float32 (exact to 2^24) and experts indexed as int32.
  if (dims.back() < 1 || dims.back() > (int64_t(1) << 24)) return fail("num_experts must be in [1, 2^24]");
  if (score_function < 0 || score_function > 2) return fail("unknown score_function");
  return RowShapes{*dtype, ScoreFunction(score_function), leading_count(dims), dims.back()};
}

// tokens_per_expert: a float32 or int32 vector of n elements.
inline std::optional<Counts> counts_vector(const ffi::AnyBuffer& b, int64_t n) {
  const auto t = b.element_type();
  if ((t != ffi::DataType::F32 && t != ffi::DataType::S32) || b.dimensions().size() != 1 || b.dimensions()[0] != n)
    return std::nullopt;
  return Counts{b.untyped_data(), t == ffi::DataType::S32};
}

// The loss output: a float scalar.
inline std::optional<Dtype> scalar_float(const ffi::AnyBuffer& b) {
  if (b.dimensions().size() != 0) return std::nullopt;
  return float_dtype(b.element_type());
}

inline std::string loss_outputs_error() {
  return "aux loss outputs must be a float scalar, float32 [2] and float32 [" + std::to_string(kSumWorkspace) + "]";
}

// probs or d probs (`name`): a float array [T, C], with float32 or int32 counts tpe [C].
inline ffi::ErrorOr<ColumnShapes> check_columns(const ffi::AnyBuffer& a, const ffi::AnyBuffer& tpe,
                                                const std::string& name) {
  const auto dims = a.dimensions();
  const auto dtype = float_dtype(a.element_type());
  if (dims.size() != 2 || !dtype) return fail(name + " must be a float32, bfloat16 or float16 array [T, C]");
  const auto counts = counts_vector(tpe, dims[1]);
  if (!counts) return fail("tokens_per_expert must be float32 or int32 [C]");
  return ColumnShapes{*dtype, *counts, dims[0], dims[1]};
}

// d logits: the dtype and shape of logits.
inline bool like(const ffi::AnyBuffer& out, const ffi::AnyBuffer& logits) {
  return out.element_type() == logits.element_type() && same_dims(out.dimensions(), logits.dimensions());
}

}  // namespace aux_detail

inline ffi::ErrorOr<RowShapes> check_aux_scores_fwd(const ffi::AnyBuffer& logits, const ffi::AnyBuffer& scores,
                                                    const ffi::AnyBuffer& counts, int64_t topk, int64_t score_function) {
  using namespace aux_detail;
  auto s = check_rows(logits, score_function);
  if (s.has_error()) return s;
  if (topk < 1 || topk > s->experts) return fail("topk must be in [1, num_experts]");
  if (scores.element_type() != ffi::DataType::F32 || !same_dims(scores.dimensions(), logits.dimensions()))
    return fail("aux scores must be float32 with the shape of logits");
  if (counts.element_type() != ffi::DataType::S32 || counts.dimensions().size() != 1 ||
      counts.dimensions()[0] != s->experts)
    return fail("tokens_per_expert must be int32 [num_experts]");
  return s;
}

inline ffi::ErrorOr<RowShapes> check_aux_scores_bwd(const ffi::AnyBuffer& logits, const ffi::AnyBuffer& dscores,
                                                    const ffi::AnyBuffer& dlogits, int64_t score_function) {
  using namespace aux_detail;
  auto s = check_rows(logits, score_function);
  if (s.has_error()) return s;
  if (dscores.element_type() != ffi::DataType::F32 || !same_dims(dscores.dimensions(), logits.dimensions()) ||
      !like(dlogits, logits))
    return fail("aux scores backward: d scores must be float32 and d logits like logits");
  return s;
}

inline ffi::ErrorOr<ProbsShapes> check_aux_loss_fwd(const ffi::AnyBuffer& probs, const ffi::AnyBuffer& tpe,
                                                    const ffi::AnyBuffer& loss, const ffi::AnyBuffer& buf,
                                                    const ffi::AnyBuffer& workspace) {
  using namespace aux_detail;
  const auto c = check_columns(probs, tpe, "probs");
  if (c.has_error()) return ffi::Unexpected<ffi::Error>(c.error());
  const auto loss_dtype = scalar_float(loss);
  if (!loss_dtype || !f32_vector(buf, 2) || !f32_vector(workspace, kSumWorkspace)) return fail(loss_outputs_error());
  ProbsShapes s{c->dtype, *loss_dtype, c->tpe, c->rows, c->cols, 0, 0, 0};
  s.vec = probs_vector_width(s.cols, s.dtype == Dtype::kF32 ? 4 : 2);
  s.vectors = s.rows * s.cols / s.vec;
  s.blocks = sum_blocks(s.vectors, kSumThreads);
  return s;
}

// The loss output is float32 (checked): its dtype is not returned.
inline ffi::ErrorOr<RowShapes> check_aux_logits_fwd(const ffi::AnyBuffer& logits, const ffi::AnyBuffer& tpe,
                                                    const ffi::AnyBuffer& loss, const ffi::AnyBuffer& buf,
                                                    const ffi::AnyBuffer& workspace, int64_t score_function) {
  using namespace aux_detail;
  auto s = check_rows(logits, score_function);
  if (s.has_error()) return s;
  const auto counts = counts_vector(tpe, s->experts);
  if (!counts) return fail("tokens_per_expert must be float32 or int32 [num_experts]");
  s->tpe = *counts;
  if (scalar_float(loss) != Dtype::kF32 || !f32_vector(buf, 2) || !f32_vector(workspace, kSumWorkspace))
    return fail(loss_outputs_error());
  return s;
}

inline ffi::ErrorOr<RowShapes> check_aux_logits_bwd(const ffi::AnyBuffer& logits, const ffi::AnyBuffer& tpe,
                                                    const ffi::AnyBuffer& buf, const ffi::AnyBuffer& g,
                                                    const ffi::AnyBuffer& dlogits, int64_t score_function) {
  using namespace aux_detail;
  auto s = check_rows(logits, score_function);
  if (s.has_error()) return s;
  const auto counts = counts_vector(tpe, s->experts);
  if (!counts) return fail("tokens_per_expert must be float32 or int32 [num_experts]");
  s->tpe = *counts;
  if (const char* error = residuals_error(buf, g)) return fail(error);
  if (!like(dlogits, logits)) return fail("d logits must have the dtype and shape of logits");
  return s;
}

inline ffi::ErrorOr<ColumnShapes> check_aux_loss_bwd(const ffi::AnyBuffer& buf, const ffi::AnyBuffer& tpe,
                                                     const ffi::AnyBuffer& g, const ffi::AnyBuffer& dprobs) {
  using namespace aux_detail;
  const auto c = check_columns(dprobs, tpe, "d probs");
  if (c.has_error()) return c;
  if (const char* error = residuals_error(buf, g)) return fail(error);
  return c;
}

}  // namespace jax_moe
