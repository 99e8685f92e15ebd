// The FFI handler symbols that the extension modules export to JAX.
#pragma once

#include "xla/ffi/api/ffi.h"

namespace jax_moe {

XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_moe_route_fwd_cpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_moe_route_bwd_cpu);

XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_moe_route_fwd_cuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_moe_route_bwd_cuda);

}  // namespace jax_moe
