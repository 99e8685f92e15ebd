"""Fused MoE routing: scores, expert bias, group selection, top-k, normalisation and scaling.

Reads top to bottom: the public function, its custom_vjp, then the primitives.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._ffi import TokenParallel, batch_size, kernel_primitive, move_batch_to_front

_SCORE_FUNCTIONS = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}  # values of ScoreFunction in moe_math.h
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class Routing(NamedTuple):
    """The experts chosen for each token: weights float32 [..., k], indices int32 [..., k]."""

    weights: jax.Array
    indices: jax.Array


def route(
    logits,
    topk: int,
    *,
    score_function: str = "softmax",
    expert_bias=None,
    num_groups: int | None = None,
    group_topk: int | None = None,
    group_score_topn: int | None = None,
    use_pre_softmax: bool = False,
    renormalize: bool | None = None,
    topk_reduce_func: Callable | None = None,
    scaling_factor: float = 1.0,
) -> Routing:
    """Routes each token to `topk` experts in one fused kernel (SPEC §1).

    Args:
      logits: [..., E] float32, bfloat16 or float16 router logits; all leading dims are tokens.
      topk: number of experts per token, 1 <= topk <= E.
      score_function: "softmax", "sigmoid" or "sqrtsoftplus".
      expert_bias: optional [E] float array (any float dtype, read as is: no convert op). It only
        changes which experts are chosen and gets a zero gradient.
      num_groups, group_topk, group_score_topn: group-limited routing (DeepSeek-V3: 8, 4, and the
        default max(1, topk // group_topk) = 2). A group scores the sum of its
        group_score_topn best selection scores; only the group_topk best groups stay eligible.
      use_pre_softmax: softmax only; select on softmax scores instead of raw logits.
      renormalize: divide the chosen values by their sum (+1e-20). Defaults to True for
        sigmoid/sqrtsoftplus with topk > 1, else False; softmax without use_pre_softmax is already
        normalised and rejects True.
      topk_reduce_func: replaces the renormalisation sum: w = v / topk_reduce_func(v), with v the
        chosen values [..., k]. Runs as ordinary JAX after the kernel (differentiated by JAX) and
        needs renormalisation on.
      scaling_factor: static multiplier applied last.

    Returns:
      Routing(weights float32 [..., k], indices int32 [..., k]), ordered by selection score,
      ties to the lower expert index, NaN ranking below every number.

    Decisions where the SPEC is silent:
      * softmax without use_pre_softmax selects on the raw logits, so a NaN logit ranks last and
        the row's weights stay finite unless a NaN is chosen (with use_pre_softmax every score of
        such a row is NaN and experts 0..k-1 are chosen with NaN weights).
      * under vmap with a batched expert_bias, the kernel runs once per bias (lax.map).
    """
    logits = _check_logits(logits)
    num_experts = logits.shape[-1]
    bias = _check_bias(expert_bias, num_experts)
    config = _route_config(
        num_experts, topk, score_function, num_groups, group_topk, group_score_topn,
        use_pre_softmax, renormalize, topk_reduce_func, scaling_factor,
    )
    if topk_reduce_func is None:
        return Routing(*_route(logits, bias, config))
    # The kernel returns the un-normalised chosen values; the custom reduction is plain JAX.
    values, indices = _route(logits, bias, config._replace(renormalize=False, scaling_factor=1.0))
    weights = values / topk_reduce_func(values) * config.scaling_factor
    return Routing(weights.astype(jnp.float32), indices)


def routing_map(indices, num_experts: int) -> jax.Array:
    """Dense bool [..., E] map with True at each token's chosen experts."""
    return jnp.any(_one_hot(indices, num_experts), axis=-2)


def dense_weights(weights, indices, num_experts: int) -> jax.Array:
    """Dense float32 [..., E] weights: each chosen expert's weight, zero elsewhere."""
    hits = _one_hot(indices, num_experts)
    return jnp.sum(jnp.where(hits, jnp.asarray(weights, jnp.float32)[..., None], 0.0), axis=-2)


def _one_hot(indices, num_experts: int) -> jax.Array:
    return jnp.asarray(indices)[..., None] == jnp.arange(num_experts, dtype=jnp.int32)


# ------------------------------------------------------------------ checking
class RouteConfig(NamedTuple):
    """Static kernel attributes (names match the FFI handlers' attributes)."""

    topk: int
    score_function: int
    use_pre_softmax: bool
    num_groups: int  # 0: no groups
    group_topk: int
    group_score_topn: int
    renormalize: bool
    scaling_factor: float


def _static_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a static Python int, got {type(value).__name__}")
    return operator.index(value)


def _check_logits(logits) -> jax.Array:
    logits = jnp.asarray(logits)
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.ndim < 1:
        raise ValueError("logits must have shape [..., num_experts], got a scalar")
    return logits


def _check_bias(expert_bias, num_experts: int) -> jax.Array:
    if expert_bias is None:
        return jnp.zeros((0,), jnp.float32)
    bias = jnp.asarray(expert_bias)
    if bias.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"expert_bias must be float32, bfloat16 or float16, got {bias.dtype}")
    if bias.shape != (num_experts,):
        raise ValueError(f"expert_bias must have shape ({num_experts},), got {bias.shape}")
    return bias


def _route_config(num_experts, topk, score_function, num_groups, group_topk, group_score_topn,
                  use_pre_softmax, renormalize, topk_reduce_func, scaling_factor) -> RouteConfig:
    topk = _static_int(topk, "topk")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk must be in [1, num_experts={num_experts}], got {topk}")
    if score_function not in _SCORE_FUNCTIONS:
        raise ValueError(f"score_function must be one of {sorted(_SCORE_FUNCTIONS)}, got {score_function!r}")
    if not isinstance(use_pre_softmax, bool):
        raise TypeError("use_pre_softmax must be a static bool")
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float, np.floating, np.integer)):
        raise TypeError(f"scaling_factor must be a static Python number, got {type(scaling_factor).__name__}")
    groups = _group_config(num_experts, topk, num_groups, group_topk, group_score_topn)
    softmax_post = score_function == "softmax" and not use_pre_softmax
    if renormalize is None:
        renormalize = score_function != "softmax" and topk > 1
    elif not isinstance(renormalize, bool):
        raise TypeError("renormalize must be a static bool or None")
    if softmax_post and renormalize:
        raise ValueError("renormalize=True is not allowed for softmax without use_pre_softmax: "
                         "its weights are already a softmax over the chosen experts")
    if topk_reduce_func is not None:
        if not callable(topk_reduce_func):
            raise TypeError("topk_reduce_func must be callable")
        if not renormalize:
            raise ValueError("topk_reduce_func replaces the renormalisation sum, so it needs "
                             "renormalize on (it is off for softmax without use_pre_softmax and by default for k=1)")
    return RouteConfig(topk, _SCORE_FUNCTIONS[score_function], use_pre_softmax, *groups, renormalize,
                       float(scaling_factor))


def _group_config(num_experts, topk, num_groups, group_topk, group_score_topn) -> tuple[int, int, int]:
    if num_groups is None:
        if group_topk is not None or group_score_topn is not None:
            raise ValueError("group_topk and group_score_topn need num_groups")
        return 0, 0, 0
    num_groups = _static_int(num_groups, "num_groups")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups}")
    if group_topk is None:
        raise ValueError("group_topk is required with num_groups")
    group_topk = _static_int(group_topk, "group_topk")
    if not 1 <= group_topk <= num_groups:
        raise ValueError(f"group_topk must be in [1, num_groups={num_groups}], got {group_topk}")
    group_size = num_experts // num_groups
    topn = max(1, topk // group_topk) if group_score_topn is None else _static_int(group_score_topn, "group_score_topn")
    if not 1 <= topn <= group_size:
        raise ValueError(f"group_score_topn must be in [1, num_experts / num_groups = {group_size}], got {topn}")
    if topk > group_topk * group_size:
        raise ValueError(f"topk={topk} exceeds the {group_topk * group_size} experts of the "
                         f"group_topk={group_topk} kept groups")
    return num_groups, group_topk, topn


# ---------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _route(logits, bias, config: RouteConfig):
    return tuple(route_fwd_p.bind(logits, bias, **config._asdict()))


def _route_fwd(logits, bias, config):
    weights, indices = route_fwd_p.bind(logits, bias, **config._asdict())
    return (weights, indices), (logits, indices, jnp.zeros_like(bias))


def _route_bwd(config, residuals, cotangents):
    logits, indices, zero_bias = residuals
    dweights, _ = cotangents  # indices are integers: no cotangent
    (dlogits,) = route_bwd_p.bind(logits, indices, dweights, **config._asdict())
    return dlogits, zero_bias


_route.defvjp(_route_fwd, _route_bwd)


# ---------------------------------------------------------------- primitives
def _route_fwd_abstract(logits, bias, *, topk, **_):
    shape = (*logits.shape[:-1], topk)
    return (logits.update(shape=shape, dtype=jnp.float32), logits.update(shape=shape, dtype=jnp.int32))


def _route_bwd_abstract(logits, indices, dweights, **_):
    return (logits.update(),)


def _route_fwd_batch(prim, args, dims, **params):
    logits, bias = args
    logits_dim, bias_dim = dims
    if bias_dim is None:  # vmap marks unbatched operands with None
        # Leading dims are tokens to the kernel: the batch is just more tokens.
        return prim.bind(jnp.moveaxis(logits, logits_dim, 0), bias, **params), (0, 0)
    logits, bias = move_batch_to_front(args, dims, batch_size(args, dims))
    outs = jax.lax.map(lambda lb: tuple(prim.bind(*lb, **params)), (logits, bias))
    return list(outs), (0, 0)


def _tokenwise_batch(prim, args, dims, **params):
    return prim.bind(*move_batch_to_front(args, dims, batch_size(args, dims)), **params), (0,)


route_fwd_p = kernel_primitive("jax_moe_route_fwd", _route_fwd_abstract, _route_fwd_batch,
                               TokenParallel(replicated=(1,)))
route_bwd_p = kernel_primitive("jax_moe_route_bwd", _route_bwd_abstract, _tokenwise_batch, TokenParallel())
