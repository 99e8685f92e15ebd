"""jax_moe: fused Mixture-of-Experts kernels as JAX primitives (CPU and CUDA)."""

from ._ffi import available_platforms
from .routing import Routing, dense_weights, route, routing_map

__all__ = ["Routing", "available_platforms", "dense_weights", "route", "routing_map"]
