"""Pure-JAX MoE building blocks, written the way a user would write them today (MaxText / vLLM style).

These are the benchmark anchors and a readable statement of what the fused kernels compute; they are not
used by the kernels. They follow SPEC §1-§3 except for the ranking corner cases of `jax.lax.top_k`, which
they inherit rather than work around:

- NaN ranks by its sign bit (top_k's total order): a positive NaN above +inf, so it is picked first,
  a negative NaN below -inf (SPEC: every NaN below -inf, lower index first);
- +0.0 ranks above -0.0 (SPEC: they tie, lower index first);
- experts of dropped groups are masked with -inf, so an allowed expert whose score is -inf ties with
  them and the lower index wins even if it is in a dropped group (SPEC: dropped experts never chosen).

On finite inputs without signed-zero ties they agree with the SPEC exactly, up to float32 rounding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-20
F32 = jnp.float32


def _scores(x, score_function):
  if score_function == "softmax":
    return jax.nn.softmax(x, axis=-1)
  if score_function == "sigmoid":
    return jax.nn.sigmoid(x)
  if score_function == "sqrtsoftplus":
    return jnp.sqrt(jnp.where(x > 20, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20)))))
  raise ValueError(f"unknown score_function {score_function!r}")


def _mask_dropped_groups(z, num_groups, group_topk, group_score_topn):
  """Keeps the group_topk groups with the largest sum of their top group_score_topn scores."""
  grouped = z.reshape(*z.shape[:-1], num_groups, -1)
  group_scores = jax.lax.top_k(grouped, group_score_topn)[0].sum(-1)
  _, kept = jax.lax.top_k(group_scores, group_topk)
  kept_mask = jax.nn.one_hot(kept, num_groups, dtype=jnp.bool_).any(-2)
  return jnp.where(kept_mask[..., None], grouped, -jnp.inf).reshape(z.shape)


def route(logits, topk, *, score_function="softmax", expert_bias=None, num_groups=None,
          group_topk=None, group_score_topn=None, use_pre_softmax=False, renormalize=None,
          topk_reduce_func=None, scaling_factor=1.0):
  """Top-k routing (SPEC §1). Returns (weights float32 [..., k], indices int32 [..., k])."""
  x = logits.astype(F32)
  s = _scores(x, score_function)
  softmax_post = score_function == "softmax" and not use_pre_softmax
  z = x if softmax_post else s
  if expert_bias is not None:
    z = z + expert_bias.astype(F32)
  if num_groups is not None:
    n = group_score_topn if group_score_topn is not None else max(1, topk // group_topk)
    z = _mask_dropped_groups(z, num_groups, group_topk, n)
  _, indices = jax.lax.top_k(z, topk)
  if softmax_post:
    weights = jax.nn.softmax(jnp.take_along_axis(x, indices, -1), axis=-1)
  else:
    weights = jnp.take_along_axis(s, indices, -1)
  if renormalize is None:
    renormalize = score_function != "softmax" and topk > 1
  if topk_reduce_func is not None:
    weights = weights / topk_reduce_func(weights)
  elif renormalize:
    weights = weights / (weights.sum(-1, keepdims=True) + EPS)
  return weights * scaling_factor, indices.astype(jnp.int32)


def tokens_per_expert(indices, num_experts):
  """int32 [E] counts of each expert in `indices`; indices outside [0, E) are not counted."""
  flat = indices.reshape(-1)
  valid = (flat >= 0) & (flat < num_experts)
  return jnp.zeros(num_experts, jnp.int32).at[jnp.where(valid, flat, num_experts)].add(1, mode="drop")


def aux_loss_scores(logits, topk, *, score_function="softmax"):
  """Clean scores float32 [..., E] (normalised over all experts) and their top-k counts int32 [E]."""
  x = logits.astype(F32)
  s = _scores(x, score_function)
  if score_function != "softmax":
    s = s / (s.sum(-1, keepdims=True) + EPS)
  _, indices = jax.lax.top_k(s, topk)
  return s, tokens_per_expert(indices, x.shape[-1])


def aux_loss(probs, tokens_per_expert, *, topk, coeff, num_experts=None, total_num_tokens=None):
  """Load-balancing loss E·coeff/(k·T²) · Σ_c (Σ_t probs[t, c]) · tpe[c], in probs' dtype (SPEC §2).

  Unsharded: T defaults to probs.shape[0]; there is no axis_name.
  """
  num_tokens, columns = probs.shape
  num_experts = columns if num_experts is None else num_experts
  total = num_tokens if total_num_tokens is None else total_num_tokens
  if total == 0:
    return jnp.zeros((), probs.dtype)
  coeff_scaled = num_experts * coeff / (topk * total * total)
  column_sums = probs.astype(F32).sum(0)
  loss = coeff_scaled * jnp.sum(column_sums * tokens_per_expert.astype(F32))
  return loss.astype(probs.dtype)


def grouped_matmul(lhs, rhs, group_sizes):
  """[M, K] x [G, K, N] -> [M, N] with rows grouped by group_sizes: jax.lax.ragged_dot, f32 accumulation."""
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=F32)
  return out.astype(lhs.dtype)


def permute(x, indices, num_experts):
  """Sorts the (token, slot) pairs by expert, stably (SPEC §3).

  Returns x_sorted [T·k, H] (zero rows for indices outside [0, E), which come last), group_sizes int32 [E]
  and sort_map int32 [T·k] with sort_map[r] = t·k + j of the pair in row r.
  """
  topk = indices.shape[-1]
  flat = indices.reshape(-1)
  valid = (flat >= 0) & (flat < num_experts)
  sort_map = jnp.argsort(jnp.where(valid, flat, num_experts), stable=True).astype(jnp.int32)
  rows = jnp.where(valid[sort_map, None], x[sort_map // topk], 0).astype(x.dtype)
  return rows, tokens_per_expert(flat, num_experts), sort_map


def unpermute(y_sorted, sort_map, weights):
  """y[t] = Σ_j weights[t, j] · y_sorted[row of pair (t, j)], accumulated in float32, in y_sorted's dtype."""
  num_tokens, topk = weights.shape
  row_of_pair = jnp.zeros_like(sort_map).at[sort_map].set(jnp.arange(sort_map.size, dtype=sort_map.dtype))
  pairs = y_sorted[row_of_pair].reshape(num_tokens, topk, -1).astype(F32)
  return jnp.einsum("tk,tkh->th", weights.astype(F32), pairs).astype(y_sorted.dtype)
