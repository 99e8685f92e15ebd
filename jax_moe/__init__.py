"""jax_moe: fused Mixture-of-Experts kernels as JAX primitives (CPU and CUDA)."""

from ._ffi import available_platforms
from .routing import Routing, dense_weights, route, route_with_aux_loss, routing_map
from .aux_loss import aux_loss, aux_loss_from_logits, aux_loss_scores, loss_coefficient, tokens_per_expert
from .experts import grouped_matmul, permute, unpermute

__all__ = ["Routing", "available_platforms", "dense_weights", "route", "route_with_aux_loss", "routing_map"]
__all__ += ["aux_loss", "aux_loss_from_logits", "aux_loss_scores", "loss_coefficient", "tokens_per_expert"]
__all__ += ["grouped_matmul", "permute", "unpermute"]
