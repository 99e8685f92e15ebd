// aux_loss_scores' forward on the routing kernels' segment layout (routing_cuda.cu): a token's top k in
// O(k log S) shuffles, where the row kernel of aux_loss_cuda.cu takes k warp-wide arg-max passes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ffi_helpers.h"

namespace jax_moe {

// Whether aux_scores_segments is the faster kernel for rows of `experts` experts and this top k.
bool aux_scores_on_segments(int64_t experts, int64_t topk);

// Writes the clean scores of T >= 1 rows of E experts to scores (float32 [T, E]) and adds each expert's
// top-k hits to counts (zeroed by the caller).
ffi::Error aux_scores_segments(cudaStream_t stream, int32_t device, Dtype dtype, ScoreFunction f, int64_t topk,
                               const void* logits, int64_t T, int64_t E, float* scores, int* counts);

}  // namespace jax_moe
