// CUDA handler of the aux loss's backward: d probs[t, c] = (buf[0] · g) · tpe[c] in probs' dtype, the
// same row on every token (SPEC §2).
//
// A pure write of T·C elements, so the kernel only has to keep HBM busy: d probs is written as vectors
// of V elements (16 bytes where C allows: probs_vector_width, so a vector never spans rows; narrower
// for other C, one element for odd C) by a grid-stride loop over enough blocks to fill the GPU. A
// thread's column moves by the same step each iteration; when that step is 0 its converted row piece
// is computed once and only stored afterwards, else the counts are read again (they stay in L1/L2).
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <string>

#include "aux_loss_ffi.h"
#include "handlers.h"

namespace jax_moe {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;  // 2048 threads an SM: full occupancy, stores always in flight

// V consecutive elements stored at p, with one vector store when kVector (then p is aligned to it).
template <class S, int V, bool kVector>
__device__ __forceinline__ void store_n(S* __restrict__ p, const S (&v)[V]) {
  if constexpr (kVector) {
    struct alignas(V * sizeof(S)) Pack {
      S v[V];
    };
    Pack pk;
#pragma unroll
    for (int j = 0; j < V; ++j) pk.v[j] = v[j];
    *reinterpret_cast<Pack*>(p) = pk;
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) p[j] = v[j];
  }
}

// Thread `first` writes vectors first, first + stride, ...; vector v holds columns (v · V) % C onwards.
template <class In, int V, bool kVector>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    aux_probs_bwd_kernel(Counts tpe, const float* __restrict__ buf, const float* __restrict__ g, int64_t vectors,
                         int64_t cols, typename In::storage* __restrict__ dprobs) {
  using S = typename In::storage;
  const ScaledCounts row{tpe, buf[0] * g[0]};
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t col_step = (stride * V) % cols;
  int64_t col = (first * V) % cols;
  S out[V];
  const auto row_piece = [&] {
    float w[V];
    weights_at(row, col, w);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = In::from_float(w[j]);
  };
  if (col_step == 0 && first < vectors) row_piece();
#pragma unroll 4
  for (int64_t v = first; v < vectors; v += stride) {
    if (col_step != 0) row_piece();
    store_n<S, V, kVector>(dprobs + v * V, out);
    col += col_step;
    if (col >= cols) col -= cols;
  }
}

// ------------------------------------------------------------------ launch
// Queried once per device: handlers run on many calls, possibly from several threads.
int sm_count(int device) {
  static std::array<std::atomic<int>, 64> sms{};
  const int slot = device & 63;
  if (sms[slot].load() == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    sms[slot].store(n > 0 ? n : 1);
  }
  return sms[slot].load();
}

// Launches the kernel with vectors of V elements, V = `width` (a power of two up to 16 bytes' worth).
template <class In, int V = int(16 / sizeof(typename In::storage))>
void launch(cudaStream_t stream, int device, const DprobsShapes& s, int width, const float* buf, const float* g,
            void* dprobs) {
  using S = typename In::storage;
  if constexpr (V > 1) {
    if (width < V) return launch<In, V / 2>(stream, device, s, width, buf, g, dprobs);
  }
  const int64_t vectors = s.rows * s.cols / V;
  const int64_t blocks =
      std::min<int64_t>((vectors + kThreads - 1) / kThreads, int64_t(sm_count(device)) * kBlocksPerSm);
  const bool vector = reinterpret_cast<uintptr_t>(dprobs) % (V * sizeof(S)) == 0;
  auto kernel = vector ? aux_probs_bwd_kernel<In, V, true> : aux_probs_bwd_kernel<In, V, false>;
  kernel<<<unsigned(blocks), kThreads, 0, stream>>>(s.tpe, buf, g, vectors, s.cols, static_cast<S*>(dprobs));
}

ffi::Error aux_loss_bwd(cudaStream_t stream, int32_t device, ffi::AnyBuffer buf, ffi::AnyBuffer tpe, ffi::AnyBuffer g,
                        ffi::Result<ffi::AnyBuffer> dprobs) {
  auto shapes = check_aux_loss_bwd(buf, tpe, g, *dprobs);
  if (shapes.has_error()) return shapes.error();
  const DprobsShapes s = *shapes;
  if (s.rows == 0 || s.cols == 0) return ffi::Error::Success();
  return dispatch_float(s.dtype, [&]<class In>() {
    const int width = probs_vector_width(s.cols, sizeof(typename In::storage));
    launch<In>(stream, device, s, width, buf.typed_data<float>(), g.typed_data<float>(), dprobs->untyped_data());
    const cudaError_t err = cudaGetLastError();
    if (err == cudaSuccess) return ffi::Error::Success();
    return ffi::Error::Internal(std::string("jax_moe: aux loss backward: ") + cudaGetErrorString(err));
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_aux_loss_bwd_cuda, aux_loss_bwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace jax_moe
