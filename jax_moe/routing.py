"""Fused MoE routing: scores, expert bias, group selection, top-k, normalisation and scaling.

Reads top to bottom: the public function, its custom_vjp, then the primitives.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import _checks as checks
from .aux_loss import loss_coefficient
from ._ffi import TokenParallel, batch_as_tokens, batch_per_call, kernel_primitive, reduced_aval, token_aval



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

    Speed: two configs run CUDA kernels compiled for them, 10-20% faster than the general ones
    (any expert_bias and scaling_factor): DeepSeek-V3's (E=256, sigmoid, 8 groups, group_topk=4,
    topk=8, renormalised) and softmax over E=128 with topk=8 without use_pre_softmax. The latter
    gives the weights of Qwen2/Qwen3-MoE's router (softmax over all experts, top 8, renormalised):
    prefer it to use_pre_softmax=True with renormalize=True.
    """
    logits = _check_logits(logits)
    num_experts = logits.shape[-1]
    bias = _check_bias(expert_bias, num_experts)
    config = _route_config(
        num_experts, topk, score_function, num_groups, group_topk, group_score_topn,
        use_pre_softmax, renormalize, topk_reduce_func, scaling_factor,
    )
    values, indices = _route(logits, bias, _kernel_config(config, topk_reduce_func))
    return Routing(_weights(values, config, topk_reduce_func), indices)


def route_with_aux_loss(
    logits,
    topk: int,
    *,
    aux_coeff: float,
    aux_topk: int | None = None,
    aux_score_function: str | None = None,
    score_function: str = "softmax",
    expert_bias=None,
    num_groups: int | None = None,
    group_topk: int | None = None,
    group_score_topn: int | None = None,
    use_pre_softmax: bool = False,
    renormalize: bool | None = None,
    topk_reduce_func: Callable | None = None,
    scaling_factor: float = 1.0,
    axis_name=None,
) -> tuple[Routing, jax.Array]:
    """`route(...)` and its load-balancing aux loss from one pass over the logits (SPEC §2).

    Returns (route(logits, topk, ...), loss) with loss = aux_loss_from_logits(logits, tpe,
    topk=aux_topk, coeff=aux_coeff, score_function=aux_score_function) and tpe the global counts of
    each expert among the tokens' top-aux_topk clean scores. aux_topk defaults to topk and
    aux_score_function to score_function; the loss is float32.

    The forward kernel routes each token and adds its clean scores to per-expert column sums and its
    top-aux_topk experts to per-expert counts (deterministic sums: bit-identical run after run), and
    forms the loss C_coeff * sum(colsum * counts) from them (sharded, the statistics are summed over
    the shards first, and the loss formed from the global ones). The backward kernel adds the
    clean-score gradient of C_coeff * counts * d loss to the routing gradient in the same pass.

    axis_name: inside shard_map, the axes over which column sums, counts and the token count are
    global. Under jit with token-sharded logits, they are global without it.
    """
    logits = _check_logits(logits)
    num_experts = logits.shape[-1]
    bias = _check_bias(expert_bias, num_experts)
    config = _route_config(
        num_experts, topk, score_function, num_groups, group_topk, group_score_topn,
        use_pre_softmax, renormalize, topk_reduce_func, scaling_factor,
    )
    aux_topk = config.topk if aux_topk is None else checks.topk_in_range(aux_topk, num_experts, "aux_topk")
    aux_score_function = score_function if aux_score_function is None else aux_score_function
    aux_score_id = checks.score_function(aux_score_function, "aux_score_function")
    axes = checks.axis_names(axis_name)
    tokens = checks.total_tokens(None, math.prod(logits.shape[:-1]), axes)
    c_coeff = loss_coefficient(num_experts, checks.static_float(aux_coeff, "aux_coeff"), aux_topk, tokens)
    aux = AuxConfig(aux_topk, aux_score_id, c_coeff, axes)
    values, indices, loss = _route_aux(logits, bias, _kernel_config(config, topk_reduce_func), aux)
    return Routing(_weights(values, config, topk_reduce_func), indices), loss


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


class AuxConfig(NamedTuple):
    """Static settings of the fused aux loss."""

    topk: int
    score_function: int
    c_coeff: float  # E * coeff / (topk * T^2) with the global T
    axes: tuple  # shard_map axes the statistics are summed over


def _aux_blocks(num_experts: int) -> int:
    """Blocks of the fused forward kernel, hence rows of its workspaces: fixed by E alone so the
    block-ordered sums do not depend on the device, and so shards share the workspace shape. At
    most 512: about the blocks that an H100 keeps resident at once (four an SM), so none waits for a
    second wave. Fewer tokens launch fewer blocks and fill fewer rows: T alone decides how many."""
    return min(512, max(32, 2**19 // num_experts))


def _kernel_config(config: RouteConfig, topk_reduce_func) -> RouteConfig:
    """With a topk_reduce_func the kernel returns the un-normalised chosen values instead."""
    return config if topk_reduce_func is None else config._replace(renormalize=False, scaling_factor=1.0)


def _weights(values, config: RouteConfig, topk_reduce_func) -> jax.Array:
    """The kernel's weights, or its chosen values normalised by topk_reduce_func in plain JAX."""
    if topk_reduce_func is None:
        return values
    return (values / topk_reduce_func(values) * config.scaling_factor).astype(jnp.float32)


def _check_logits(logits) -> jax.Array:
    logits = checks.float_array(logits, "logits")
    if logits.ndim < 1:
        raise ValueError("logits must have shape [..., num_experts], got a scalar")
    return logits


def _check_bias(expert_bias, num_experts: int) -> jax.Array:
    if expert_bias is None:
        return jnp.zeros((0,), jnp.float32)
    bias = checks.float_array(expert_bias, "expert_bias")
    if bias.shape != (num_experts,):
        raise ValueError(f"expert_bias must have shape ({num_experts},), got {bias.shape}")
    return bias


def _route_config(num_experts, topk, score_function, num_groups, group_topk, group_score_topn,
                  use_pre_softmax, renormalize, topk_reduce_func, scaling_factor) -> RouteConfig:
    topk = checks.topk_in_range(topk, num_experts)
    score_function_id = checks.score_function(score_function)
    if not isinstance(use_pre_softmax, bool):
        raise TypeError("use_pre_softmax must be a static bool")
    scaling_factor = checks.static_float(scaling_factor, "scaling_factor")
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
    return RouteConfig(topk, score_function_id, use_pre_softmax, *groups, renormalize, scaling_factor)


def _group_config(num_experts, topk, num_groups, group_topk, group_score_topn) -> tuple[int, int, int]:
    if num_groups is None:
        if group_topk is not None or group_score_topn is not None:
            raise ValueError("group_topk and group_score_topn need num_groups")
        return 0, 0, 0
    num_groups = checks.static_int(num_groups, "num_groups")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups}")
    if group_topk is None:
        raise ValueError("group_topk is required with num_groups")
    group_topk = checks.static_int(group_topk, "group_topk")
    if not 1 <= group_topk <= num_groups:
        raise ValueError(f"group_topk must be in [1, num_groups={num_groups}], got {group_topk}")
    group_size = num_experts // num_groups
    topn = max(1, topk // group_topk) if group_score_topn is None else checks.static_int(group_score_topn, "group_score_topn")
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _route_aux(logits, bias, config: RouteConfig, aux: AuxConfig):
    return _route_aux_fwd(logits, bias, config, aux)[0]


def _route_aux_fwd(logits, bias, config, aux):
    weights, indices, colsum, counts, loss, _, _ = route_aux_fwd_p.bind(
        logits, bias, **config._asdict(), aux_topk=aux.topk, aux_score_function=aux.score_function,
        c_coeff=aux.c_coeff)
    if aux.axes:  # the kernel's loss is this shard's alone
        colsum, counts, loss = _global_statistics(colsum, counts, aux.axes, aux.c_coeff)
    return (weights, indices, loss), (logits, indices, counts, jnp.zeros_like(bias))


def _global_statistics(colsum, counts, axes, c_coeff: float):
    """Per-shard column sums and counts summed over `axes`, and the loss C_coeff · Σ_e colsum[e] · counts[e]
    formed from them as the forward kernel forms it. C_coeff inside the sum: XLA makes one reduction kernel
    of it, not a reduction and a multiply."""
    colsum, counts = jax.lax.psum((colsum, counts), axes)
    return colsum, counts, jnp.sum(colsum * (counts.astype(jnp.float32) * c_coeff))


def _route_aux_bwd(config, aux, residuals, cotangents):
    logits, indices, counts, zero_bias = residuals
    dweights, _, dloss = cotangents
    # The kernel forms d loss / d clean score, (C_coeff · dloss) · counts, for every row: no XLA kernel for it.
    (dlogits,) = route_aux_bwd_p.bind(logits, indices, dweights, counts, dloss, **config._asdict(),
                                      aux_score_function=aux.score_function, c_coeff=aux.c_coeff)
    return dlogits, zero_bias


_route_aux.defvjp(_route_aux_fwd, _route_aux_bwd)


# ---------------------------------------------------------------- primitives
def _route_fwd_abstract(logits, bias, *, topk, **_):
    return token_aval(logits, topk, jnp.float32), token_aval(logits, topk, jnp.int32)


def _route_bwd_abstract(logits, indices, *_, **__):
    return (logits.update(),)


def _route_aux_fwd_abstract(logits, bias, *, topk, aux_topk, **_):
    weights, indices = _route_fwd_abstract(logits, bias, topk=topk)
    num_experts = logits.shape[-1]
    workspace = (_aux_blocks(num_experts), num_experts)
    return (weights, indices,
            reduced_aval(logits, (num_experts,), jnp.float32),
            reduced_aval(logits, (num_experts,), jnp.int32),
            reduced_aval(logits, (), jnp.float32),
            reduced_aval(logits, workspace, jnp.float32),
            reduced_aval(logits, workspace, jnp.int32))


def _combine_route_aux(results, axes, params):
    """Per-shard statistics -> the global ones, and the loss from them; the workspaces are dropped."""
    weights, indices, colsum, counts, _, *workspaces = results
    return [weights, indices, *_global_statistics(colsum, counts, axes, params["c_coeff"]), *workspaces]


def _route_fwd_batch(prim, args, dims, **params):
    logits, bias = args
    logits_dim, bias_dim = dims
    if bias_dim is None:  # vmap marks unbatched operands with None
        # Leading dims are tokens to the kernel: the batch is just more tokens.
        return prim.bind(jnp.moveaxis(logits, logits_dim, 0), bias, **params), (0, 0)
    return batch_per_call(prim, args, dims, **params)


route_fwd_p = kernel_primitive("jax_moe_route_fwd", _route_fwd_abstract, _route_fwd_batch,
                               TokenParallel(replicated=(1,)))
route_bwd_p = kernel_primitive("jax_moe_route_bwd", _route_bwd_abstract, batch_as_tokens, TokenParallel())
# The fused aux statistics are sums over all tokens of a call: under vmap each batch element
# keeps its own, so both fused primitives loop over the batch.
route_aux_fwd_p = kernel_primitive("jax_moe_route_aux_fwd", _route_aux_fwd_abstract, batch_per_call,
                                   TokenParallel(replicated=(1,), reduced=(2, 3, 4), scratch=(5, 6),
                                                 combine=_combine_route_aux))
route_aux_bwd_p = kernel_primitive("jax_moe_route_aux_bwd", _route_bwd_abstract, batch_per_call,
                                   TokenParallel(replicated=(3, 4)))
