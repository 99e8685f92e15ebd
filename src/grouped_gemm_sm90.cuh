// sm_90a grouped GEMM built on CUTLASS's pointer-array grouped kernels (TMA loads, wgmma, TMA
// epilogue stores, persistent group tile scheduler). Problem shapes, pointers and strides live in
// device memory only: a one-block prep kernel derives them from the device-resident group sizes, so
// nothing is read back to the host. The TMA descriptors are rewritten per group on the device with
// the group's own extent, so rows past a group are neither read (zero fill) nor written (clipped).
//
// Each (op, dtype) is instantiated in its own translation unit (see
// grouped_gemm_sm90_*.cu) through JAX_MOE_SM90_DEFINE: one instantiation costs about a minute of
// compile time and ~3.5 GB of compiler memory.
//
// Must be compiled with -DNDEBUG: without it, device asserts split the wgmma pipeline across a
// function call and ptxas serialises every wgmma (warning C7510).
#pragma once

#if !defined(NDEBUG)
#error "grouped_gemm_sm90.cuh must be compiled with -DNDEBUG (serialised wgmma otherwise)"
#endif

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <mutex>
#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/util/packed_stride.hpp"
#include "grouped_gemm_internal.h"
#include "grouped_gemm_prep.cuh"

#if !defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#error "CUTLASS grouped GEMM needs on-device TMA descriptor updates (CUDA >= 12.3)"
#endif

namespace jax_moe::detail::sm90 {

using namespace cute;

// Two consumer warpgroups share one 128x256 tile, one CTA a cluster. Multicasting the A tile to the
// neighbouring N tile's CTA (1x2 cluster) was 7-25% slower on the DeepSeek-V3 shapes and within
// noise on the others (GEMM_NOTES.md, session 6 sweep).
struct Coop128x256 {
  using Tile = Shape<_128, _256, _64>;
  using Cluster = Shape<_1, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};

// Same tile, 2x1 cluster: the B tile (256 wide) is multicast to the CTAs of two neighbouring M
// tiles. Best for d rhs, whose M is the dense K (no padding) and whose short contraction makes the
// operand traffic per flop high.
struct Coop128x256MulticastB {
  using Tile = Shape<_128, _256, _64>;
  using Cluster = Shape<_2, _1, _1>;
  using MainloopSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};

// The tile config of each op: the fastest of the session 6 sweep on all six benchmark shapes.
template <GemmOp Op>
using OpConfig = std::conditional_t<Op == GemmOp::kGradRhs, Coop128x256MulticastB, Coop128x256>;

// CUTLASS layouts of the per-group GEMM D[M,N] = A[M,K] B[K,N] for each op (see grouped_gemm.h):
//   kForward: A = lhs_g [m_g,K] row-major, B = rhs[g] [K,N] row-major (N-major), D = out_g.
//   kGradLhs: A = dout_g [m_g,N] row-major, B = rhs[g]^T: [N,K] view of a row-major [K,N] array,
//             i.e. column-major (K-major), D = dlhs_g [m_g,K].
//   kGradRhs: A = lhs_g^T: [K,m_g] view of row-major [m_g,K], i.e. column-major (M-major),
//             B = dout_g [m_g,N] row-major, D = drhs[g] [K,N]; the ragged dimension is the
//             contraction.
template <GemmOp Op>
struct OpLayouts;
template <>
struct OpLayouts<GemmOp::kForward> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::RowMajor;
};
template <>
struct OpLayouts<GemmOp::kGradLhs> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::ColumnMajor;
};
template <>
struct OpLayouts<GemmOp::kGradRhs> {
  using A = cutlass::layout::ColumnMajor;
  using B = cutlass::layout::RowMajor;
};

template <class Element_, GemmOp Op_, class Config>
struct GroupedKernel {
  using Element = Element_;
  static constexpr GemmOp Op = Op_;
  using LayoutA = typename OpLayouts<Op>::A;
  using LayoutB = typename OpLayouts<Op>::B;
  using LayoutD = cutlass::layout::RowMajor;
  // 16-byte TMA alignment, in elements.
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // per group (M,N,K)

  // C is void: no source operand is read (beta = 0), D gets the f32 accumulators rounded once.
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Config::Tile,
      typename Config::Cluster, cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD*, kAlign, Element, LayoutD*, kAlign, typename Config::EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element,
      LayoutB*, kAlign, float, typename Config::Tile, typename Config::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Config::MainloopSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using ElementD = typename Epilogue::ElementD;
};

// Byte offsets of the per-group arrays inside the scratch (which follows the group tables).
struct ScratchLayout {
  size_t shapes, ptr_a, ptr_b, ptr_d, stride_a, stride_b, stride_d, cutlass, total;
};

template <class GK>
typename GK::Kernel::Arguments make_arguments(char* scratch, const ScratchLayout& l, int64_t G,
                                              int device, int sm_count, int max_active_clusters) {
  using Element = typename GK::Element;
  typename GK::Kernel::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {static_cast<int>(G),
                        reinterpret_cast<typename GK::Shape3*>(scratch + l.shapes), nullptr};
  args.mainloop = {reinterpret_cast<const Element**>(scratch + l.ptr_a),
                   reinterpret_cast<typename GK::StrideA*>(scratch + l.stride_a),
                   reinterpret_cast<const Element**>(scratch + l.ptr_b),
                   reinterpret_cast<typename GK::StrideB*>(scratch + l.stride_b)};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = nullptr;
  args.epilogue.ptr_D = reinterpret_cast<typename GK::ElementD**>(scratch + l.ptr_d);
  args.epilogue.dD = reinterpret_cast<typename GK::StrideD*>(scratch + l.stride_d);
  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count;
  args.hw_info.max_active_clusters = max_active_clusters;
  return args;
}

template <class GK>
ScratchLayout scratch_layout(int64_t G, int sm_count) {
  const size_t g = static_cast<size_t>(G);
  ScratchLayout l{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at = align_up(at + bytes, kWorkspaceAlign);
    return here;
  };
  l.shapes = take(g * sizeof(typename GK::Shape3));
  l.ptr_a = take(g * sizeof(void*));
  l.ptr_b = take(g * sizeof(void*));
  l.ptr_d = take(g * sizeof(void*));
  l.stride_a = take(g * sizeof(typename GK::StrideA));
  l.stride_b = take(g * sizeof(typename GK::StrideB));
  l.stride_d = take(g * sizeof(typename GK::StrideD));
  // CUTLASS's own workspace (per-SM TMA descriptor copies) depends on the group count and the
  // SM count only.
  typename GK::Kernel::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape.num_groups = static_cast<int>(G);
  args.hw_info.sm_count = sm_count;
  l.cutlass = take(GK::Kernel::get_workspace_size(args));
  l.total = at;
  return l;
}

// Writes the problem shape, operand pointers and strides of every group (see OpLayouts).
template <class GK>
struct ProblemVisitor {
  using Element = typename GK::Element;
  typename GK::Shape3* shapes;
  const Element** ptr_a;
  const Element** ptr_b;
  typename GK::ElementD** ptr_d;
  typename GK::StrideA* stride_a;
  typename GK::StrideB* stride_b;
  typename GK::StrideD* stride_d;
  const Element* a;
  const Element* b;
  typename GK::ElementD* out;
  int64_t K, N;

  __device__ void operator()(int64_t g, int64_t start, int64_t rows, int64_t) const {
    int m, n, k;
    if constexpr (GK::Op == GemmOp::kForward) {
      m = static_cast<int>(rows), n = static_cast<int>(N), k = static_cast<int>(K);
      ptr_a[g] = a + start * K;
      ptr_b[g] = b + g * K * N;
      ptr_d[g] = out + start * N;
    } else if constexpr (GK::Op == GemmOp::kGradLhs) {
      m = static_cast<int>(rows), n = static_cast<int>(K), k = static_cast<int>(N);
      ptr_a[g] = a + start * N;
      ptr_b[g] = b + g * K * N;
      ptr_d[g] = out + start * K;
    } else {
      // An empty group gets M = 0, hence no tiles: CUTLASS would leave the accumulators of a
      // K = 0 problem uninitialised. The dispatcher zeroes those slices instead.
      m = rows > 0 ? static_cast<int>(K) : 0, n = static_cast<int>(N), k = static_cast<int>(rows);
      ptr_a[g] = a + start * K;
      ptr_b[g] = b + start * N;
      ptr_d[g] = out + g * K * N;
    }
    shapes[g] = make_shape(m, n, k);
    stride_a[g] = cutlass::make_cute_packed_stride(typename GK::StrideA{}, make_shape(m, k, 1));
    stride_b[g] = cutlass::make_cute_packed_stride(typename GK::StrideB{}, make_shape(n, k, 1));
    stride_d[g] = cutlass::make_cute_packed_stride(typename GK::StrideD{}, make_shape(m, n, 1));
  }
  __device__ void finish(int64_t) const {}
};

constexpr int kMaxDevices = 64;

// Per-device, per-kernel one-time setup: the dynamic shared-memory opt-in (a function attribute of
// the current device) and the number of clusters that fit at once (sizes the persistent grid).
struct DeviceSetup {
  cudaError_t status = cudaSuccess;
  int max_active_clusters = 0;
};

template <class Kernel>
DeviceSetup query_device_setup() {
  DeviceSetup s;
  s.status = cudaFuncSetAttribute(cutlass::device_kernel<Kernel>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(Kernel::SharedStorageSize));
  if (s.status == cudaSuccess)
    s.max_active_clusters = cutlass::KernelHardwareInfo::query_device_max_active_clusters<Kernel>();
  return s;
}

template <class Kernel>
DeviceSetup device_setup(int device) {
  static std::once_flag once[kMaxDevices];
  static DeviceSetup setup[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return query_device_setup<Kernel>();
  std::call_once(once[device], [device] { setup[device] = query_device_setup<Kernel>(); });
  return setup[device];
}

template <class GK>
size_t scratch_bytes(int64_t G, int sm_count) {
  return scratch_layout<GK>(G, sm_count).total;
}

template <class GK>
cudaError_t run(const GroupedGemmArgs& args, GroupTables tables, char* scratch, int sm_count,
                cudaStream_t stream) {
  using Kernel = typename GK::Kernel;
  using Element = typename GK::Element;
  if (args.G > INT_MAX || args.M > INT_MAX || args.K > INT_MAX || args.N > INT_MAX)
    return cudaErrorNotSupported;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const DeviceSetup setup = device_setup<Kernel>(device);
  if (setup.status != cudaSuccess) return setup.status;

  const ScratchLayout l = scratch_layout<GK>(args.G, sm_count);
  auto arguments = make_arguments<GK>(scratch, l, args.G, device, sm_count,
                                      setup.max_active_clusters);
  if (!Kernel::can_implement(arguments)) return cudaErrorNotSupported;

  const ProblemVisitor<GK> visitor{
      reinterpret_cast<typename GK::Shape3*>(scratch + l.shapes),
      reinterpret_cast<const Element**>(scratch + l.ptr_a),
      reinterpret_cast<const Element**>(scratch + l.ptr_b),
      reinterpret_cast<typename GK::ElementD**>(scratch + l.ptr_d),
      reinterpret_cast<typename GK::StrideA*>(scratch + l.stride_a),
      reinterpret_cast<typename GK::StrideB*>(scratch + l.stride_b),
      reinterpret_cast<typename GK::StrideD*>(scratch + l.stride_d),
      static_cast<const Element*>(args.a),
      static_cast<const Element*>(args.b),
      static_cast<typename GK::ElementD*>(args.out),
      args.K,
      args.N};
  group_prep_kernel<<<1, kPrepThreads, 0, stream>>>(args.group_sizes, args.G, args.M, 1, tables,
                                                    visitor);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  void* cutlass_ws = scratch + l.cutlass;
  if (Kernel::initialize_workspace(arguments, cutlass_ws, stream) != cutlass::Status::kSuccess)
    return cudaErrorUnknown;
  auto params = Kernel::to_underlying_arguments(arguments, cutlass_ws);
  if (GK::Gemm::run(params, stream) != cutlass::Status::kSuccess) {
    err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace jax_moe::detail::sm90

// Defines the two entry points declared in grouped_gemm_internal.h for one instantiation.
#define JAX_MOE_SM90_DEFINE(NAME, ELEMENT, OP)                                                  \
  namespace jax_moe::detail {                                                                  \
  using NAME##_kernel = sm90::GroupedKernel<ELEMENT, OP, sm90::OpConfig<OP>>;                  \
  size_t sm90_scratch_bytes_##NAME(int64_t G, int sm_count) {                                  \
    return sm90::scratch_bytes<NAME##_kernel>(G, sm_count);                                    \
  }                                                                                            \
  cudaError_t sm90_run_##NAME(const GroupedGemmArgs& args, GroupTables tables, char* scratch,  \
                              int sm_count, cudaStream_t stream) {                             \
    return sm90::run<NAME##_kernel>(args, tables, scratch, sm_count, stream);                  \
  }                                                                                            \
  }
