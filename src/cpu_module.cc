#include "handlers.h"
#include "module.h"

NB_MODULE(_jax_moe_cpu, m) {
  using namespace jax_moe;
  define_module(m, {
                       {"jax_moe_route_fwd", jax_moe_route_fwd_cpu},
                       {"jax_moe_route_bwd", jax_moe_route_bwd_cpu},
                   });
}
