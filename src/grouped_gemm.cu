// Grouped GEMM dispatcher: validates a call, handles the degenerate shapes, picks the sm_90a
// CUTLASS path or the generic kernel, and zeroes the outputs that no group writes.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <mutex>

#include "grouped_gemm.h"
#include "grouped_gemm_internal.h"

namespace jax_moe {
namespace detail {
namespace {

constexpr int kMaxDevices = 64;
// Workspace sizing when the caller does not know the device (an H100 SXM has 132 SMs).
constexpr int kDefaultSmCount = 132;
constexpr int kZeroThreads = 256;

struct DeviceInfo {
  cudaError_t status = cudaSuccess;
  int sm_count = 0;
  int cc_major = 0;
  int cc_minor = 0;
};

DeviceInfo query_device_info(int device) {
  DeviceInfo d;
  d.status = cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device);
  if (d.status == cudaSuccess)
    d.status = cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device);
  if (d.status == cudaSuccess)
    d.status = cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, device);
  return d;
}

// Device attributes are queried once per device: the call path stays free of driver queries.
DeviceInfo device_info(int device) {
  static std::once_flag once[kMaxDevices];
  static DeviceInfo info[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return query_device_info(device);
  std::call_once(once[device], [device] { info[device] = query_device_info(device); });
  return info[device];
}

bool is_16bit(GemmDtype d) { return d == GemmDtype::kBF16 || d == GemmDtype::kF16; }

// a * b for non-negative operands, false on int64 overflow.
bool checked_mul(int64_t a, int64_t b, int64_t* out) {
  if (a != 0 && b > INT64_MAX / a) return false;
  *out = a * b;
  return true;
}

// Shape constraints of the sm_90a path that do not depend on the device: TMA needs 16-byte
// aligned rows and group starts (K and N multiples of 8 elements) and CUTLASS int32 extents.
bool sm90_shapes_ok(GemmDtype dtype, int64_t M, int64_t K, int64_t N, int64_t G) {
  return is_16bit(dtype) && K % 8 == 0 && N % 8 == 0 && M <= INT_MAX && K <= INT_MAX &&
         N <= INT_MAX && G <= INT_MAX;
}

// The sm_90a kernel for (op, dtype), or {nullptr, nullptr} when it was not compiled.
Sm90Kernel sm90_kernel(GemmOp op, GemmDtype dtype) {
  if (!is_16bit(dtype)) return {nullptr, nullptr};
#if defined(JAX_MOE_HAS_SM90_GEMM)
#define JAX_MOE_SM90_ENTRY(NAME) Sm90Kernel{&sm90_scratch_bytes_##NAME, &sm90_run_##NAME}
  // [op][bf16, f16]
  static const Sm90Kernel table[3][2] = {
      {JAX_MOE_SM90_ENTRY(fwd_bf16), JAX_MOE_SM90_ENTRY(fwd_f16)},
      {JAX_MOE_SM90_ENTRY(dlhs_bf16), JAX_MOE_SM90_ENTRY(dlhs_f16)},
      {JAX_MOE_SM90_ENTRY(drhs_bf16), JAX_MOE_SM90_ENTRY(drhs_f16)},
  };
#undef JAX_MOE_SM90_ENTRY
  return table[static_cast<int>(op)][dtype == GemmDtype::kBF16 ? 0 : 1];
#else
  (void)op;
  return {nullptr, nullptr};
#endif
}

// Zeroes bytes [0, len) of p with `nworkers` threads, 16-byte stores where aligned.
__device__ void zero_bytes(char* p, int64_t len, int64_t worker, int64_t nworkers) {
  const int64_t misalign = static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(p) & 15)) & 15);
  const int64_t head = misalign < len ? misalign : len;
  for (int64_t i = worker; i < head; i += nworkers) p[i] = 0;
  const int64_t vecs = (len - head) / 16;
  uint4* v = reinterpret_cast<uint4*>(p + head);
  for (int64_t i = worker; i < vecs; i += nworkers) v[i] = make_uint4(0, 0, 0, 0);
  for (int64_t i = head + vecs * 16 + worker; i < len; i += nworkers) p[i] = 0;
}

// kForward / kGradLhs: rows [offsets[G], M) belong to no group.
__global__ void __launch_bounds__(kZeroThreads)
    zero_tail_rows_kernel(char* out, const int64_t* offsets, int64_t G, int64_t M,
                          int64_t row_bytes) {
  const int64_t first = offsets[G];
  zero_bytes(out + first * row_bytes, (M - first) * row_bytes,
             static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
             static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// kGradRhs: the [K, N] slices of empty groups (listed by the prep kernel).
__global__ void __launch_bounds__(kZeroThreads)
    zero_empty_groups_kernel(char* out, const int32_t* empty_groups, int64_t slice_bytes) {
  const int32_t count = empty_groups[0];
  for (int32_t e = 0; e < count; ++e)
    zero_bytes(out + empty_groups[1 + e] * slice_bytes, slice_bytes,
               static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
               static_cast<int64_t>(gridDim.x) * blockDim.x);
}

unsigned zero_grid(int64_t max_bytes, int sm_count) {
  const int64_t per_block = static_cast<int64_t>(kZeroThreads) * 16 * 4;
  const int64_t blocks = (max_bytes + per_block - 1) / per_block;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, 2 * static_cast<int64_t>(sm_count)));
}

size_t element_bytes(GemmDtype d) { return d == GemmDtype::kF32 ? 4 : 2; }

}  // namespace

cudaError_t grouped_gemm_impl(const GroupedGemmArgs& args, GemmImpl impl, cudaStream_t stream) {
  const int op_i = static_cast<int>(args.op), dtype_i = static_cast<int>(args.dtype);
  if (op_i < 0 || op_i > 2 || dtype_i < 0 || dtype_i > 2) return cudaErrorInvalidValue;
  if (args.M < 0 || args.K < 0 || args.N < 0 || args.G < 0 || args.G > INT_MAX)
    return cudaErrorInvalidValue;
  const int64_t es = static_cast<int64_t>(element_bytes(args.dtype));
  // Every operand's byte size must fit int64.
  int64_t kn, mk, mn, gkn, max_bytes;
  if (!checked_mul(args.K, args.N, &kn) || !checked_mul(args.M, args.K, &mk) ||
      !checked_mul(args.M, args.N, &mn) || !checked_mul(args.G, kn, &gkn) ||
      !checked_mul(std::max({mk, mn, gkn}), es, &max_bytes))
    return cudaErrorInvalidValue;
  const int64_t out_rows = args.op == GemmOp::kGradRhs ? args.G : args.M;
  const int64_t row_width = args.op == GemmOp::kForward   ? args.N
                            : args.op == GemmOp::kGradLhs ? args.K
                                                          : kn;
  const int64_t out_bytes = out_rows * row_width * es;
  if (out_bytes == 0) return cudaSuccess;
  if (args.out == nullptr) return cudaErrorInvalidValue;
  // Contraction length of the dense (non-ragged) ops; 0 means every output element is 0.
  const int64_t contraction = args.op == GemmOp::kForward ? args.K
                              : args.op == GemmOp::kGradLhs ? args.N
                                                            : args.M;
  if (args.G == 0 || contraction == 0) return cudaMemsetAsync(args.out, 0, out_bytes, stream);
  if (args.a == nullptr || args.b == nullptr || args.group_sizes == nullptr)
    return cudaErrorInvalidValue;

  // Workspace: align the base, then the group tables, then the implementation's scratch.
  if (args.workspace == nullptr) return cudaErrorInvalidValue;
  const uintptr_t base = reinterpret_cast<uintptr_t>(args.workspace);
  const size_t pad = align_up(base, kWorkspaceAlign) - base;
  const size_t tables_bytes = group_tables_bytes(args.G);
  if (args.workspace_bytes < pad + tables_bytes) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(args.workspace) + pad;
  const size_t n_tables = static_cast<size_t>(args.G + 1);
  GroupTables tables{reinterpret_cast<int64_t*>(ws),
                     args.op == GemmOp::kGradRhs
                         ? reinterpret_cast<int32_t*>(ws + align_up(sizeof(int64_t) * n_tables,
                                                                   kWorkspaceAlign))
                         : nullptr};
  char* scratch = ws + tables_bytes;
  const size_t scratch_avail = args.workspace_bytes - pad - tables_bytes;

  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const DeviceInfo dev = device_info(device);
  if (dev.status != cudaSuccess) return dev.status;

  const bool sm90_possible = dev.cc_major == 9 && dev.cc_minor == 0 &&
                             sm90_shapes_ok(args.dtype, args.M, args.K, args.N, args.G);
  const GemmImpl chosen =
      impl != GemmImpl::kAuto ? impl : sm90_possible ? GemmImpl::kSm90 : GemmImpl::kGeneric;

  err = cudaErrorNotSupported;
  if (chosen != GemmImpl::kGeneric) {
    const Sm90Kernel k = sm90_kernel(args.op, args.dtype);
    if (sm90_possible && k.run != nullptr) {
      // A workspace sized for fewer SMs than this device has runs the persistent kernel on fewer
      // SMs rather than fail.
      int sms = dev.sm_count;
      while (sms > 0 && k.scratch_bytes(args.G, sms) > scratch_avail) --sms;
      err = sms > 0 ? k.run(args, tables, scratch, sms, stream) : cudaErrorInvalidValue;
    }
    if (err != cudaSuccess && impl != GemmImpl::kAuto) return err;
  }
  if (err != cudaSuccess) {
    if (generic_scratch_bytes(args.op, args.G) > scratch_avail) return cudaErrorInvalidValue;
    err = generic_run(args, tables, scratch, stream);
    if (err != cudaSuccess) return err;
  }

  char* out = static_cast<char*>(args.out);
  if (args.op == GemmOp::kGradRhs) {
    zero_empty_groups_kernel<<<zero_grid(kn * es, dev.sm_count), kZeroThreads, 0, stream>>>(
        out, tables.empty_groups, kn * es);
  } else {
    zero_tail_rows_kernel<<<zero_grid(out_bytes, dev.sm_count), kZeroThreads, 0, stream>>>(
        out, tables.offsets, args.G, args.M, row_width * es);
  }
  return cudaGetLastError();
}

}  // namespace detail

size_t grouped_gemm_workspace_bytes(GemmOp op, GemmDtype dtype, int64_t M, int64_t K, int64_t N,
                                    int64_t G, int sm_count) {
  const int op_i = static_cast<int>(op), dtype_i = static_cast<int>(dtype);
  if (op_i < 0 || op_i > 2 || dtype_i < 0 || dtype_i > 2 || M < 0 || K < 0 || N < 0 || G < 0 ||
      G > INT_MAX)
    return 0;
  const int sms = sm_count > 0 ? sm_count : detail::kDefaultSmCount;
  size_t scratch = detail::generic_scratch_bytes(op, G);
  if (detail::sm90_shapes_ok(dtype, M, K, N, G)) {
    const detail::Sm90Kernel k = detail::sm90_kernel(op, dtype);
    if (k.scratch_bytes != nullptr) scratch = std::max(scratch, k.scratch_bytes(G, sms));
  }
  return detail::kWorkspaceAlign + detail::group_tables_bytes(G) + scratch;
}

cudaError_t grouped_gemm(const GroupedGemmArgs& args, cudaStream_t stream) {
  return detail::grouped_gemm_impl(args, detail::GemmImpl::kAuto, stream);
}

}  // namespace jax_moe
