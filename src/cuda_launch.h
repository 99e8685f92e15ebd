// Host helpers that the CUDA handlers share: the device's limits, and the status of a launch.
#pragma once

#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jax_moe {

struct DeviceLimits {
  int sm_count;
  int smem_optin;  // bytes of dynamic shared memory a block may opt in to
};

// Queried once per device: handlers run on many calls, possibly from several threads.
inline DeviceLimits device_limits(int device) {
  static std::array<std::atomic<int>, 64> sms{}, smem{};
  const int slot = device & 63;
  if (sms[slot].load() == 0) {
    int n = 0, bytes = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    smem[slot].store(bytes);
    sms[slot].store(n > 0 ? n : 1);
  }
  return {sms[slot].load(), smem[slot].load()};
}

// The context most CUDA handlers bind first: their stream and their device.
inline auto bind_stream_and_device() {
  return xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>().Ctx<xla::ffi::DeviceOrdinal>();
}

// The error of the launches just made, if any, as an FFI error naming `what`.
inline xla::ffi::Error launch_status(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return xla::ffi::Error::Success();
  return xla::ffi::Error::Internal(std::string("jax_moe: ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace jax_moe
