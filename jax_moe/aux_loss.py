"""Load-balancing auxiliary loss (SPEC §2): clean scores and their top-k counts, the loss from probs,
and the loss fused with the scores, straight from the router logits.

Reads top to bottom: the public functions, their custom_vjps, then the primitives.

The loss is loss = C_coeff · Σ_c (Σ_t probs[t, c]) · tokens_per_expert[c] with
C_coeff = E · coeff / (topk · T²). Kernels produce a float32 [2] buffer [C_coeff, loss] and the loss itself
(buffer[1] in the output dtype, so no separate kernel slices or converts it); the backward reads only
buffer[0] (d probs[t, c] = C_coeff · tokens_per_expert[c] · d loss), so nothing is recomputed. The sum
is deterministic: a two-stage reduction whose order depends only on the shapes, without float atomics, so
the same inputs on the same device give a bit-identical loss run after run.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _checks as checks
from ._ffi import (TokenParallel, TokensFromResults, batch_as_tokens, batch_per_call, derived_aval, kernel_primitive,
                   reduced_aval)

_WORKSPACE = 1025  # kSumWorkspace in aux_loss_row.h: stage-1 partials and a block counter


def loss_coefficient(num_experts: int, coeff: float, topk: int, total_num_tokens: int) -> float:
    """C_coeff = num_experts · coeff / (topk · total_num_tokens²), or 0.0 when there are no tokens.

    Computed in float64 on the host; the kernels receive it as float32.
    """
    if total_num_tokens == 0:
        return 0.0
    return float(num_experts) * float(coeff) / (float(topk) * float(total_num_tokens) ** 2)


def aux_loss_scores(logits, topk: int, *, score_function: str = "softmax"):
    """Clean scores of the router logits and how many tokens pick each expert among their top-k.

    Args:
      logits: [..., E] float32, bfloat16 or float16; all leading dims are tokens.
      topk: the k of the counts, 1 <= topk <= E (static).
      score_function: "softmax" (softmax over E), "sigmoid" or "sqrtsoftplus" (a(x) / (Σ_E a + 1e-20)).

    Returns:
      (scores float32 [..., E], tokens_per_expert int32 [E]). The counts rank each token's float32 scores
      as route does (SPEC §1.4): descending, ties to the lower expert index, -0.0 == +0.0, NaN below
      everything (a NaN logit makes its whole row NaN, so that token counts for experts 0..k-1).

    Only the scores are differentiable. Decisions where the SPEC is silent:
      * under jit with logits sharded along tokens, the counts are the global counts (per-shard counts
        summed with psum; logits are never gathered). Inside shard_map they are the local counts: sum
        them with jax.lax.psum, or count with tokens_per_expert(..., axis_name=...).
      * under vmap, each batch element gets its own counts ([B, E]); the kernel runs once per element.
      * the kernels form a score as numerator · (1 / denominator) in float32, within an ulp of the
        quotient: a division per expert would cost the GPU kernels several times more.
    """
    logits = _check_float(logits, "logits")
    topk = checks.topk_in_range(topk, logits.shape[-1])
    return _aux_scores(logits, topk, checks.score_function(score_function))


def aux_loss(probs, tokens_per_expert, *, topk: int, coeff: float, num_experts: int | None = None,
             total_num_tokens: int | None = None, axis_name=None):
    """The load-balancing loss C_coeff · Σ_c (Σ_t probs[t, c]) · tokens_per_expert[c] (SPEC §2).

    Args:
      probs: [T, C] float32, bfloat16 or float16, C a multiple of num_experts (C = E: the batch loss;
        C = B·E: the per-sequence loss).
      tokens_per_expert: [C], any integer or float dtype: the global counts (never summed again).
      topk, coeff: static numbers of C_coeff = E · coeff / (topk · T²); 1 <= topk <= E.
      num_experts: E (static), default C.
      total_num_tokens: T (static), default the global token count: probs.shape[0] under jit (global
        even when probs is sharded), times the size of the `axis_name` axes inside shard_map.
      axis_name: inside shard_map, the axis name or tuple of names over which the token sums (and the
        default T) are taken; the returned loss is then the global loss on every shard.

    Returns:
      The scalar loss in probs' dtype, accumulated in float32 (0 when T is 0). Its gradient with respect
      to probs has probs' dtype.

    Decisions where the SPEC is silent:
      * tokens_per_expert gets a zero gradient (it holds counts).
      * under vmap, a batch dimension of probs is a batch of independent losses (each with its own T);
        the kernel runs once per batch element (lax.map).
      * under jit with probs sharded along tokens, each shard sums its rows and the float32 partial
        losses are added with psum, so the result matches the unsharded loss to float32 rounding (the
        order of the sum differs), not bit for bit.
      * the backward writes d probs from the saved coefficient and counts alone (probs is not kept). Under
        jit it is written sharded along tokens as its users need it (e.g. the router's backward of
        token-sharded logits, or out_shardings), each device writing only its rows; returned from jit
        with no sharding asked for, it is replicated.
    """
    probs = _check_float(probs, "probs")
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape [T, C], got rank {probs.ndim}")
    num_cols = probs.shape[1]
    num_experts = num_cols if num_experts is None else checks.static_int(num_experts, "num_experts")
    if num_experts < 1 or num_cols % num_experts:
        raise ValueError(f"num_experts must be >= 1 and divide C = probs.shape[1] = {num_cols}, got {num_experts}")
    tpe = _check_counts(tokens_per_expert, num_cols)
    topk = checks.topk_in_range(topk, num_experts)
    coeff = checks.static_float(coeff, "coeff")
    axes = checks.axis_names(axis_name)
    tokens = checks.total_tokens(total_num_tokens, probs.shape[0], axes)
    c_coeff = loss_coefficient(num_experts, coeff, topk, tokens)
    loss, partial = _loss(probs, tpe, c_coeff, (probs.shape[0], probs.dtype))
    if axes:  # add the shards' float32 partial losses, then round
        return jax.lax.psum(partial, axes).astype(probs.dtype)
    return loss


def aux_loss_from_logits(logits, tokens_per_expert, *, topk: int, coeff: float, score_function: str = "softmax",
                         total_num_tokens: int | None = None, axis_name=None):
    """aux_loss(aux_loss_scores(logits, topk, score_function=...)[0], tokens_per_expert, ...), fused.

    The forward reads the logits once and writes only the loss; the backward writes d logits directly
    (the clean-score backward of C_coeff · tokens_per_expert · d loss), with no [T, E] d scores.

    Args:
      logits: [..., E] float32, bfloat16 or float16; all leading dims are tokens.
      tokens_per_expert: [E], any integer or float dtype: the global counts.
      topk, coeff, total_num_tokens, axis_name: as in aux_loss, with T defaulting to the number of
        token rows of logits (times the `axis_name` axes' size inside shard_map).
      score_function: "softmax", "sigmoid" or "sqrtsoftplus", as in aux_loss_scores.

    Returns:
      The float32 scalar loss. tokens_per_expert gets a zero gradient; under vmap the losses of the batch
      elements are independent (lax.map); under jit with logits sharded along tokens the per-shard
      partial losses are added with psum (no gather of logits).
    """
    logits = _check_float(logits, "logits")
    num_experts = logits.shape[-1]
    tpe = _check_counts(tokens_per_expert, num_experts)
    topk = checks.topk_in_range(topk, num_experts)
    coeff = checks.static_float(coeff, "coeff")
    sf = checks.score_function(score_function)
    axes = checks.axis_names(axis_name)
    tokens = checks.total_tokens(total_num_tokens, math.prod(logits.shape[:-1]), axes)
    loss = _logits_loss(logits, tpe, loss_coefficient(num_experts, coeff, topk, tokens), sf)
    return jax.lax.psum(loss, axes) if axes else loss


def tokens_per_expert(indices, num_experts: int, axis_name=None):
    """int32 [num_experts]: how many entries of `indices` (any shape, integer) name each expert.

    Indices outside [0, num_experts) count nowhere. Inside shard_map, `axis_name` (a name or a tuple of
    names) sums the counts over those axes, giving the global counts on every shard.
    """
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices must be an integer array, got {indices.dtype}")
    num_experts = checks.static_int(num_experts, "num_experts")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    axes = checks.axis_names(axis_name)
    flat = indices.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    # Out-of-range indices go to slot num_experts, which mode="drop" discards (negative ones would wrap).
    slot = jnp.where(valid, flat, num_experts).astype(jnp.int32)
    counts = jnp.zeros((num_experts,), jnp.int32).at[slot].add(1, mode="drop")
    if axes:
        checks.axes_size(axes)
        counts = jax.lax.psum(counts, axes)
    return counts


# ------------------------------------------------------------------ checking
def _check_float(x, name: str) -> jax.Array:
    x = checks.float_array(x, name)
    if x.ndim < 1:
        raise ValueError(f"{name} must have shape [..., num_experts], got a scalar")
    return x


def _check_counts(tokens_per_expert, length: int) -> jax.Array:
    tpe = jnp.asarray(tokens_per_expert)
    if tpe.dtype == jnp.bool_ or not (jnp.issubdtype(tpe.dtype, jnp.integer)
                                      or jnp.issubdtype(tpe.dtype, jnp.floating)):
        raise TypeError(f"tokens_per_expert must have an integer or float dtype, got {tpe.dtype}")
    if tpe.shape != (length,):
        raise ValueError(f"tokens_per_expert must have shape ({length},), got {tpe.shape}")
    # The kernels read int32 and float32 counts as they are (no convert kernel); others become float32.
    return tpe if tpe.dtype in (jnp.int32, jnp.float32) else tpe.astype(jnp.float32)


# ---------------------------------------------------------------- custom_vjp
def _zero_cotangent(tpe):
    """tokens_per_expert's (zero) cotangent: float0 for integer counts."""
    if jnp.issubdtype(tpe.dtype, jnp.integer):
        return np.zeros(tpe.shape, jax.dtypes.float0)
    return jnp.zeros_like(tpe)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _aux_scores(logits, topk: int, score_function: int):
    return tuple(aux_scores_fwd_p.bind(logits, topk=topk, score_function=score_function))


def _aux_scores_fwd(logits, topk, score_function):
    return _aux_scores(logits, topk, score_function), logits


def _aux_scores_bwd(topk, score_function, logits, cotangents):
    dscores, _ = cotangents  # the counts are integers: no cotangent
    (dlogits,) = aux_scores_bwd_p.bind(logits, dscores, score_function=score_function)
    return (dlogits,)


_aux_scores.defvjp(_aux_scores_fwd, _aux_scores_bwd)


# Returns (the loss in probs' dtype, the float32 loss): the kernel writes both, the caller uses one (the
# second to psum over shards before rounding). `like` = (probs.shape[0], probs.dtype): the rows the
# backward writes, without keeping probs alive.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _loss(probs, tpe, c_coeff: float, like):
    loss, buf, _ = aux_loss_fwd_p.bind(probs, tpe, coeff=c_coeff)
    return loss, buf[1]


def _loss_fwd(probs, tpe, c_coeff, like):
    loss, buf, _ = aux_loss_fwd_p.bind(probs, tpe, coeff=c_coeff)
    return (loss, buf[1]), (buf, tpe)


def _loss_bwd(c_coeff, like, residuals, cotangents):
    buf, tpe = residuals
    g = cotangents[0].astype(jnp.float32) + cotangents[1]
    tokens, dtype = like
    # One kernel writes every row of d probs, (buf[0] · g) · tpe[c] rounded once to probs' dtype: bit for
    # bit the broadcast jnp formula, at full bandwidth in bf16 too. Under jit each shard writes only its
    # rows, sharded as d probs' users want it (TokensFromResults).
    (dprobs,) = aux_loss_bwd_p.bind(buf, tpe, g, tokens=tokens, dtype=dtype)
    return dprobs, _zero_cotangent(tpe)


_loss.defvjp(_loss_fwd, _loss_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _logits_loss(logits, tpe, c_coeff: float, score_function: int):
    loss, _, _ = aux_logits_fwd_p.bind(logits, tpe, score_function=score_function, coeff=c_coeff)
    return loss


def _logits_loss_fwd(logits, tpe, c_coeff, score_function):
    loss, buf, _ = aux_logits_fwd_p.bind(logits, tpe, score_function=score_function, coeff=c_coeff)
    return loss, (logits, tpe, buf)


def _logits_loss_bwd(c_coeff, score_function, residuals, g):
    logits, tpe, buf = residuals
    (dlogits,) = aux_logits_bwd_p.bind(logits, tpe, buf, jnp.asarray(g, jnp.float32),
                                       score_function=score_function)
    return dlogits, _zero_cotangent(tpe)


_logits_loss.defvjp(_logits_loss_fwd, _logits_loss_bwd)


# ---------------------------------------------------------------- primitives
def _scores_fwd_abstract(logits, **_):
    return (logits.update(dtype=jnp.float32), reduced_aval(logits, logits.shape[-1:], jnp.int32))


def _like_logits_abstract(logits, *_, **__):
    return (logits.update(),)


def _loss_abstract(x, *_, loss_dtype, **__):
    """(loss, buffer [C_coeff, loss] float32, workspace)."""
    return (reduced_aval(x, (), loss_dtype), reduced_aval(x, (2,), jnp.float32),
            reduced_aval(x, (_WORKSPACE,), jnp.float32))


def _probs_loss_abstract(probs, tpe, **params):
    return _loss_abstract(probs, loss_dtype=probs.dtype)


def _logits_loss_abstract(logits, tpe, **params):
    return _loss_abstract(logits, loss_dtype=jnp.float32)


def _dprobs_abstract(buf, tpe, g, *, tokens, dtype):
    """d probs [tokens, C]: computed from the buffer, so varying where probs (hence the buffer) varies."""
    return (derived_aval(buf, (tokens, tpe.shape[0]), dtype),)


def _logits_bwd_batch(prim, args, dims, **params):
    logits, *shared = args
    if all(d is None for d in dims[1:]):  # tpe, buffer and cotangent shared: more tokens
        return prim.bind(jnp.moveaxis(logits, dims[0], 0), *shared, **params), (0,)
    return batch_per_call(prim, args, dims, **params)


def _combine_loss(results, axes, params):
    """Per-shard partial losses -> the global loss, added in float32 then rounded; the workspace is dropped."""
    loss, buf, workspace = results
    total = jax.lax.psum(buf[1], axes)
    return [total.astype(loss.dtype), jnp.stack([buf[0], total]), workspace]


aux_scores_fwd_p = kernel_primitive("jax_moe_aux_scores_fwd", _scores_fwd_abstract, batch_per_call,
                                    TokenParallel(reduced=(1,)))
aux_scores_bwd_p = kernel_primitive("jax_moe_aux_scores_bwd", _like_logits_abstract, batch_as_tokens,
                                    TokenParallel())
aux_loss_fwd_p = kernel_primitive("jax_moe_aux_loss_fwd", _probs_loss_abstract, batch_per_call,
                                  TokenParallel(replicated=(1,), reduced=(0, 1, 2), combine=_combine_loss))
aux_logits_fwd_p = kernel_primitive("jax_moe_aux_logits_fwd", _logits_loss_abstract, batch_per_call,
                                    TokenParallel(replicated=(1,), reduced=(0, 1, 2), combine=_combine_loss))
aux_loss_bwd_p = kernel_primitive("jax_moe_aux_loss_bwd", _dprobs_abstract, batch_per_call,
                                  TokensFromResults("tokens"), shape_params=("tokens", "dtype"))
aux_logits_bwd_p = kernel_primitive("jax_moe_aux_logits_bwd", _like_logits_abstract, _logits_bwd_batch,
                                    TokenParallel(replicated=(1, 2, 3)))
