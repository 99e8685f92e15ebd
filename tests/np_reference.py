"""Float64 NumPy reference for SPEC §1 routing: forward and backward.

Everything is computed in float64 from the logits as given (bf16/f16/f32 values are cast exactly), so the
same reference serves every input dtype. Ranking follows SPEC §1.4 literally and is done with an explicit
stable sort on a key, never with argmax/argsort tricks that treat NaN or -0.0 specially:
value descending, ties to the lower index, -0.0 == +0.0, NaN below every other value (-inf included),
lower index first among NaNs.

Degenerate rows follow the formulas (SPEC §1.6): softmax is the usual max-subtracted one, as
`jax.nn.softmax` computes it, so a softmax over values containing +inf, or all -inf, is NaN everywhere.

`route` also returns a per-row `margin`: the smallest relative gap between two *different* values whose
comparison decides the output (consecutive chosen experts, the k-th vs the next allowed expert, the last
kept vs the first dropped group). A kernel computing in float32 may legitimately order two values that
differ by less than a few float32 ulps the other way, so tests compare indices only on rows whose
margin is comfortably above float32 rounding (`is_unambiguous`). Exactly equal values are ties, decided
by index, and never make a row ambiguous.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

EPS = 1e-20
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
# Relative gap below which float32 kernel arithmetic may reorder two values (about 17 float32 ulps).
AMBIGUOUS_REL_GAP = 2e-6


class TopkReduce(NamedTuple):
  """A `topk_reduce_func` in NumPy: value(v) -> [..., 1] and its partial derivatives d value / d v."""
  value: Callable[[np.ndarray], np.ndarray]
  grad: Callable[[np.ndarray], np.ndarray]


def _max_grad(v):
  # jnp.max splits the cotangent evenly among tied maxima; do the same.
  at_max = (v == v.max(-1, keepdims=True)).astype(np.float64)
  return at_max / at_max.sum(-1, keepdims=True)


SUM_PLUS_EPS = TopkReduce(lambda v: v.sum(-1, keepdims=True) + EPS, np.ones_like)
MAX = TopkReduce(lambda v: v.max(-1, keepdims=True), _max_grad)


class RouteResult(NamedTuple):
  weights: np.ndarray   # float64 [T, k]
  indices: np.ndarray   # int64 [T, k]
  margin: np.ndarray    # float64 [T], see module docstring


class Config(NamedTuple):
  topk: int
  score_function: str
  use_pre_softmax: bool
  num_groups: int | None
  group_topk: int | None
  group_score_topn: int | None
  renormalize: bool
  reduce: TopkReduce | None
  scaling_factor: float


def make_config(topk, *, score_function="softmax", num_groups=None, group_topk=None,
                group_score_topn=None, use_pre_softmax=False, renormalize=None,
                topk_reduce_func=None, scaling_factor=1.0) -> Config:
  """Resolves SPEC §1 defaults (renormalize, group_score_topn); `topk_reduce_func` is a TopkReduce."""
  assert score_function in SCORE_FUNCTIONS
  softmax_post = score_function == "softmax" and not use_pre_softmax
  if renormalize is None:
    renormalize = score_function != "softmax" and topk > 1
  assert not (softmax_post and renormalize), "softmax-post is already normalised"
  assert topk_reduce_func is None or renormalize, "topk_reduce_func needs normalisation on"
  if num_groups is not None and group_score_topn is None:
    group_score_topn = max(1, topk // group_topk)
  return Config(topk, score_function, use_pre_softmax, num_groups, group_topk, group_score_topn,
                renormalize, topk_reduce_func, scaling_factor)


def rank(values, excluded=None):
  """Positions along the last axis, best first, by the SPEC §1.4 rule; `excluded` entries come last."""
  values = np.asarray(values, np.float64)
  nan = np.isnan(values)
  # + 0.0 turns -0.0 into +0.0; NaN keys are irrelevant because the NaN flag sorts first.
  neg = np.where(nan, 0.0, -values) + 0.0
  index = np.broadcast_to(np.arange(values.shape[-1]), values.shape)
  excluded = np.zeros(values.shape, bool) if excluded is None else excluded
  # np.lexsort sorts by the last key first.
  return np.lexsort((index, neg, nan, excluded), axis=-1)


def softmax(x, axis=-1):
  with np.errstate(invalid="ignore", over="ignore"):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x):
  with np.errstate(over="ignore"):
    return 1.0 / (1.0 + np.exp(-x))


def sqrtsoftplus(x):
  with np.errstate(over="ignore", invalid="ignore"):
    return np.sqrt(np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20)))))


def scores(x, score_function):
  return {"softmax": softmax, "sigmoid": sigmoid, "sqrtsoftplus": sqrtsoftplus}[score_function](x)


def _rel_gaps(a, b, scale_a, scale_b):
  """Relative gaps |a - b| / scale; inf where a == b exactly (a tie) or either value is not finite."""
  with np.errstate(invalid="ignore", divide="ignore"):
    gap = np.abs(a - b) / np.maximum(np.maximum(scale_a, scale_b), np.finfo(np.float64).tiny)
  decided = (a == b) | ~np.isfinite(a) | ~np.isfinite(b)
  return np.where(decided, np.inf, gap)


def _sorted_gaps(values, scale, order, count):
  """Gaps between consecutive entries of `values` taken in `order`, for the first `count` pairs."""
  v = np.take_along_axis(values, order, -1)
  s = np.take_along_axis(scale, order, -1)
  return _rel_gaps(v[:, :count], v[:, 1:count + 1], s[:, :count], s[:, 1:count + 1])


def _select(x, s, bias, cfg):
  """Chosen expert indices [T, k] and the decision margin [T]."""
  T, E = x.shape
  softmax_post = cfg.score_function == "softmax" and not cfg.use_pre_softmax
  z = x if softmax_post else s
  # `scale` is the magnitude of the summands of z: float32 rounds z relative to it.
  scale = np.abs(z)
  if bias is not None:
    z = z + bias
    scale = scale + np.abs(bias)
  margin = np.full(T, np.inf)
  allowed = np.ones((T, E), bool)
  if cfg.num_groups is not None:
    G, n = cfg.num_groups, cfg.group_score_topn
    zg = z.reshape(T * G, E // G)
    top_n = rank(zg)[:, :n]
    group_score = np.take_along_axis(zg, top_n, -1).sum(-1).reshape(T, G)
    group_scale = np.take_along_axis(scale.reshape(T * G, E // G), top_n, -1).sum(-1).reshape(T, G)
    group_order = rank(group_score)
    if cfg.group_topk < G:
      margin = np.minimum(margin, _sorted_gaps(group_score, group_scale, group_order,
                                               cfg.group_topk)[:, -1])
    kept = np.zeros((T, G), bool)
    np.put_along_axis(kept, group_order[:, :cfg.group_topk], True, -1)
    allowed = np.repeat(kept, E // G, axis=-1)
  order = rank(z, excluded=~allowed)
  k = cfg.topk
  compared = min(k, int(allowed[0].sum()) - 1) if T else 0
  if compared > 0:
    margin = np.minimum(margin, _sorted_gaps(z, scale, order, compared).min(-1))
  return order[:, :k], margin


def _unbiased_values(x, s, idx, cfg):
  if cfg.score_function == "softmax" and not cfg.use_pre_softmax:
    return softmax(np.take_along_axis(x, idx, -1))
  return np.take_along_axis(s, idx, -1)


def _normalise(v, cfg):
  with np.errstate(invalid="ignore", divide="ignore"):
    if cfg.reduce is not None:
      v = v / cfg.reduce.value(v)
    elif cfg.renormalize:
      v = v / (v.sum(-1, keepdims=True) + EPS)
  return v * cfg.scaling_factor


def _as_2d(logits, bias):
  x = np.asarray(logits).astype(np.float64)
  b = None if bias is None else np.asarray(bias).astype(np.float64)
  return x.reshape(-1, x.shape[-1]), b


def route(logits, topk, *, expert_bias=None, **config) -> RouteResult:
  """SPEC §1 forward. Leading dims are flattened: outputs are [T, k], margin is [T]."""
  cfg = make_config(topk, **config)
  x, b = _as_2d(logits, expert_bias)
  s = scores(x, cfg.score_function)
  idx, margin = _select(x, s, b, cfg)
  w = _normalise(_unbiased_values(x, s, idx, cfg), cfg)
  return RouteResult(w, idx, margin)


def _normalise_vjp(v, g, cfg, combine):
  """d loss / d v given g = d loss / d (v / norm(v)), before scaling is folded into g."""
  if cfg.reduce is not None:
    f = cfg.reduce.value(v)
    return combine(g / f, (g * v).sum(-1, keepdims=True) / f**2 * cfg.reduce.grad(v))
  if cfg.renormalize:
    S = v.sum(-1, keepdims=True) + EPS
    return combine(g / S, (g * v).sum(-1, keepdims=True) / S**2)
  return g


def _values_vjp(x, s, idx, v, gv, cfg, combine):
  """d loss / d logits [T, E] given gv = d loss / d v at the chosen experts."""
  if cfg.score_function == "softmax" and cfg.use_pre_softmax:
    g_full = np.zeros_like(x)
    np.put_along_axis(g_full, idx, gv, -1)
    return s * combine(g_full, (gv * v).sum(-1, keepdims=True))
  if cfg.score_function == "softmax":
    d_chosen = v * combine(gv, (gv * v).sum(-1, keepdims=True))
  elif cfg.score_function == "sigmoid":
    d_chosen = gv * v * (1 - v)
  else:
    d_chosen = gv * sigmoid(np.take_along_axis(x, idx, -1)) / (2 * v + EPS)
  dx = np.zeros_like(x)
  np.put_along_axis(dx, idx, d_chosen, -1)
  return dx


def route_vjp(logits, topk, cotangent, *, expert_bias=None, magnitude=False, **config) -> np.ndarray:
  """SPEC §1 backward: d sum(weights * cotangent) / d logits with the chosen set held fixed.

  Returns float64 with the shape of `logits`. With magnitude=True it evaluates the same expression
  with |cotangent| and every difference turned into a sum: a scale for the rounding error of a
  float32 evaluation, whose differences (g_i - sum g p) may cancel.
  """
  cfg = make_config(topk, **config)
  x, b = _as_2d(logits, expert_bias)
  s = scores(x, cfg.score_function)
  idx, _ = _select(x, s, b, cfg)
  v = _unbiased_values(x, s, idx, cfg)
  g = np.asarray(cotangent, np.float64).reshape(v.shape) * cfg.scaling_factor
  # Scores are non-negative, so with |g| and sums for differences every term is non-negative.
  combine = np.add if magnitude else np.subtract
  g = np.abs(g) if magnitude else g
  gv = _normalise_vjp(v, g, cfg, combine)
  return _values_vjp(x, s, idx, v, gv, cfg, combine).reshape(np.shape(logits))


def is_unambiguous(margin, rel_gap=AMBIGUOUS_REL_GAP):
  """Rows whose outputs float32 arithmetic cannot reorder (see module docstring)."""
  return margin > rel_gap
