// Lane policies of the shared row algorithms (routing_row.h) on CUDA: a group of W lanes of a warp.
// The host branches only exist to compile: these policies are used from device code.
#pragma once

#include "routing_row.h"

namespace jax_moe {

constexpr unsigned kFullMask = 0xffffffffu;

template <int W>
struct GroupLanes {
  int lane;       // within the group
  unsigned mask;  // the group's lanes
  static constexpr int nlanes = W;
  MOE_HD bool leader() const { return lane == 0; }
  MOE_HD void sync() const {
#ifdef __CUDA_ARCH__
    __syncwarp(mask);
#endif
  }
  MOE_HD float max(float v) const {
#ifdef __CUDA_ARCH__
    for (int off = W / 2; off; off >>= 1) v = fmaxf(v, __shfl_xor_sync(mask, v, off));
#endif
    return v;
  }
  MOE_HD float sum(float v) const {
#ifdef __CUDA_ARCH__
    for (int off = W / 2; off; off >>= 1) v += __shfl_xor_sync(mask, v, off);
#endif
    return v;
  }
  MOE_HD Cand best(Cand c) const {
#ifdef __CUDA_ARCH__
    for (int off = W / 2; off; off >>= 1) {
      const Cand o{__shfl_xor_sync(mask, c.key, off), __shfl_xor_sync(mask, c.idx, off)};
      if (before(o, c)) c = o;
    }
#endif
    return c;
  }
};

// A whole warp: {lane, kFullMask}.
using WarpLanes = GroupLanes<32>;

}  // namespace jax_moe
