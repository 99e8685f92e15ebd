// CUDA handlers of the grouped matmul primitives (jax.lax.ragged_dot semantics, see grouped_gemm.h).
//
// Three targets, one per GemmOp, each taking (a, b, group_sizes) and returning (out, workspace):
//   jax_moe_gmm_fwd_cuda:  a = lhs [M, K],  b = rhs [G, K, N]   -> out [M, N]
//   jax_moe_gmm_dlhs_cuda: a = dout [M, N], b = rhs [G, K, N]   -> out [M, K]
//   jax_moe_gmm_drhs_cuda: a = lhs [M, K],  b = dout [M, N]     -> out [G, K, N]
// group_sizes is int32 [G]. a, b and out share one dtype (f32, bf16 or f16). workspace is a uint8
// [W] result used as device scratch, W = grouped_gemm_workspace_bytes(op, dtype, M, K, N, G,
// sm_count) computed at trace time (grouped_gemm.h is plain C++, so the nanobind module can expose
// it directly; sm_count = 0 sizes for 132 SMs, which covers every Hopper part: a device with more
// SMs would run the persistent kernel on 132). Its contents are meaningless to the caller.
#include <cuda_runtime.h>

#include <initializer_list>
#include <string>
#include <utility>

#include "ffi_helpers.h"
#include "grouped_gemm.h"

namespace jax_moe {
namespace {

std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

bool dims_are(ffi::Span<const int64_t> d, std::initializer_list<int64_t> want) {
  if (d.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t w : want)
    if (d[i++] != w) return false;
  return true;
}

GemmDtype gemm_dtype(Dtype t) {
  switch (t) {
    case Dtype::kBF16: return GemmDtype::kBF16;
    case Dtype::kF16: return GemmDtype::kF16;
    default: return GemmDtype::kF32;
  }
}

template <GemmOp Op>
ffi::Error grouped_matmul(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer b,
                          ffi::Buffer<ffi::DataType::S32> group_sizes, ffi::Result<ffi::AnyBuffer> out,
                          ffi::Result<ffi::AnyBuffer> workspace) {
  const char* name = Op == GemmOp::kForward ? "grouped_matmul" : Op == GemmOp::kGradLhs
                                                                     ? "grouped_matmul d lhs"
                                                                     : "grouped_matmul d rhs";
  const auto dtype = float_dtype(a.element_type());
  if (!dtype || b.element_type() != a.element_type() || out->element_type() != a.element_type())
    return invalid(std::string(name) + ": operands and result must share one dtype among float32, bfloat16, float16");
  if (workspace->element_type() != ffi::DataType::U8 || workspace->dimensions().size() != 1)
    return invalid(std::string(name) + ": workspace must be a rank-1 uint8 buffer");
  if (group_sizes.dimensions().size() != 1) return invalid(std::string(name) + ": group_sizes must be rank 1");
  const auto ad = a.dimensions(), bd = b.dimensions(), od = out->dimensions();
  const int64_t G = group_sizes.dimensions()[0];
  int64_t M, K, N;
  bool ok;
  if constexpr (Op == GemmOp::kForward) {  // lhs [M, K], rhs [G, K, N] -> [M, N]
    ok = ad.size() == 2 && bd.size() == 3;
    M = ok ? ad[0] : 0, K = ok ? ad[1] : 0, N = ok ? bd[2] : 0;
    ok = ok && dims_are(bd, {G, K, N}) && dims_are(od, {M, N});
  } else if constexpr (Op == GemmOp::kGradLhs) {  // dout [M, N], rhs [G, K, N] -> [M, K]
    ok = ad.size() == 2 && bd.size() == 3;
    M = ok ? ad[0] : 0, N = ok ? ad[1] : 0, K = ok ? bd[1] : 0;
    ok = ok && dims_are(bd, {G, K, N}) && dims_are(od, {M, K});
  } else {  // lhs [M, K], dout [M, N] -> [G, K, N]
    ok = ad.size() == 2 && bd.size() == 2;
    M = ok ? ad[0] : 0, K = ok ? ad[1] : 0, N = ok ? bd[1] : 0;
    ok = ok && dims_are(bd, {M, N}) && dims_are(od, {G, K, N});
  }
  if (!ok)
    return invalid(std::string(name) + ": inconsistent shapes a=" + dims_str(ad) + " b=" + dims_str(bd) +
                   " group_sizes=" + dims_str(group_sizes.dimensions()) + " out=" + dims_str(od));

  const GroupedGemmArgs args{Op,
                             gemm_dtype(*dtype),
                             a.untyped_data(),
                             b.untyped_data(),
                             group_sizes.typed_data(),
                             out->untyped_data(),
                             M,
                             K,
                             N,
                             G,
                             workspace->untyped_data(),
                             static_cast<size_t>(workspace->element_count())};
  const cudaError_t err = grouped_gemm(args, stream);
  if (err == cudaSuccess) return ffi::Error::Success();
  if (err == cudaErrorInvalidValue)
    return invalid(std::string(name) + ": rejected the buffers (workspace of " +
                   std::to_string(workspace->element_count()) + " bytes too small, or shapes too large)");
  return ffi::Error::Internal(std::string("jax_moe: ") + name + ": " + cudaGetErrorString(err));
}

template <class Binding>
auto bind_gmm(Binding b) {
  return std::move(b)
      .template Ctx<ffi::PlatformStream<cudaStream_t>>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::DataType::S32>>()
      .template Ret<ffi::AnyBuffer>()
      .template Ret<ffi::AnyBuffer>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_gmm_fwd_cuda, grouped_matmul<GemmOp::kForward>, bind_gmm(ffi::Ffi::Bind()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_gmm_dlhs_cuda, grouped_matmul<GemmOp::kGradLhs>, bind_gmm(ffi::Ffi::Bind()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_gmm_drhs_cuda, grouped_matmul<GemmOp::kGradRhs>, bind_gmm(ffi::Ffi::Bind()),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_moe
