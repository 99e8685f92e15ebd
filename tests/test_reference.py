"""jax_moe.reference, the pure-JAX benchmark anchor, against float64 NumPy on well-separated inputs.

The anchor follows jax.lax.top_k for NaN and signed zeros (see its docstring), so these tests use
finite random inputs only.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_reference as npr
from jax_moe import reference
from test_routing import DEEPSEEK_V3, GRAD_ATOL, MODES, random_bias, random_logits

ROUTE_CASES = {  # num_experts, topk, config, bias scale (a MODES key) or None
    "deepseek_v3": (256, 8, DEEPSEEK_V3, "sigmoid"),
    "softmax_post": (64, 6, MODES["softmax_post"], None),
    "softmax_pre": (64, 6, MODES["softmax_pre"], None),
    "sqrtsoftplus_bias": (128, 8, MODES["sqrtsoftplus"], "sqrtsoftplus"),
    "sigmoid_groups_topn3": (128, 7, dict(score_function="sigmoid", num_groups=8, group_topk=3,
                                          group_score_topn=3), "sigmoid"),
}


def _inputs(rng, case, dtype=jnp.float32):
  num_experts, topk, config, bias_mode = ROUTE_CASES[case]
  logits = random_logits(rng, (257, num_experts), dtype)
  bias = None if bias_mode is None else random_bias(rng, num_experts, bias_mode)
  return logits, topk, dict(config, expert_bias=bias)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", ROUTE_CASES)
def test_route_matches_numpy(rng, case, dtype):
  logits, topk, config = _inputs(rng, case, dtype)
  weights, indices = jax.jit(functools.partial(reference.route, topk=topk, **config))(logits)
  want = npr.route(logits, topk, **config)
  decided = npr.is_unambiguous(want.margin)
  assert decided.mean() > 0.5
  assert weights.dtype == jnp.float32 and indices.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(indices)[decided], want.indices[decided])
  np.testing.assert_allclose(np.asarray(weights)[decided], want.weights[decided], rtol=1e-5,
                             atol=1e-8)


@pytest.mark.parametrize("case", ROUTE_CASES)
def test_route_gradient_matches_numpy(rng, case):
  logits, topk, config = _inputs(rng, case)
  cot = jnp.asarray(rng.normal(size=(logits.shape[0], topk)), jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(reference.route(x, topk, **config)[0] * cot))(logits)
  want = npr.route_vjp(logits, topk, cot, **config)
  # The backward subtracts (g_i - sum g p); its float32 error scales with the terms, not the result.
  bound = 1e-4 * npr.route_vjp(logits, topk, cot, magnitude=True, **config) + GRAD_ATOL
  decided = npr.is_unambiguous(npr.route(logits, topk, **config).margin)
  assert (np.abs(np.asarray(grad, np.float64) - want) <= bound)[decided].all()


def test_tokens_per_expert_drops_out_of_range(rng):
  indices = jnp.asarray(rng.integers(-2, 10, size=(50, 3)), jnp.int32)
  flat = np.asarray(indices).ravel()
  want = np.bincount(flat[(flat >= 0) & (flat < 8)], minlength=8)
  np.testing.assert_array_equal(reference.tokens_per_expert(indices, 8), want)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid", "sqrtsoftplus"])
def test_aux_loss_scores_match_numpy(rng, score_function):
  logits = random_logits(rng, (65, 32))
  scores, counts = reference.aux_loss_scores(logits, 4, score_function=score_function)
  s = npr.scores(np.asarray(logits, np.float64), score_function)
  want = s / (s.sum(-1, keepdims=True) + (score_function != "softmax") * npr.EPS)
  np.testing.assert_allclose(scores, want, rtol=1e-5)
  np.testing.assert_array_equal(counts, np.bincount(npr.rank(want)[:, :4].ravel(), minlength=32))


def test_aux_loss_matches_formula(rng):
  probs = jnp.asarray(rng.uniform(0.01, 1.0, size=(40, 24)), jnp.float32)
  tpe = jnp.asarray(rng.integers(1, 100, size=24), jnp.int32)
  loss = reference.aux_loss(probs, tpe, topk=3, coeff=0.01, num_experts=12)
  want = 12 * 0.01 / (3 * 40**2) * (np.asarray(probs, np.float64).sum(0) * np.asarray(tpe)).sum()
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_aux_loss_without_tokens_is_zero():
  loss = reference.aux_loss(jnp.ones((0, 8), jnp.bfloat16), jnp.ones(8, jnp.int32), topk=2, coeff=0.1)
  assert loss.dtype == jnp.bfloat16 and loss == 0


def test_permute_sorts_pairs_stably_by_expert(rng):
  x = jnp.asarray(rng.normal(size=(9, 5)), jnp.float32)
  indices = jnp.asarray(rng.integers(-1, 6, size=(9, 3)), jnp.int32)  # -1: no expert
  rows, group_sizes, sort_map = reference.permute(x, indices, 6)
  flat = np.asarray(indices).ravel()
  key = np.where((flat >= 0) & (flat < 6), flat, 6)
  want_map = np.argsort(key, kind="stable")
  np.testing.assert_array_equal(sort_map, want_map)
  np.testing.assert_array_equal(group_sizes, np.bincount(key, minlength=7)[:6])
  want_rows = np.where((key[want_map] < 6)[:, None], np.asarray(x)[want_map // 3], 0)
  np.testing.assert_array_equal(rows, want_rows)


def test_unpermute_weights_and_sums_each_tokens_rows(rng):
  x = jnp.asarray(rng.normal(size=(9, 5)), jnp.float32)
  indices = jnp.asarray(rng.integers(0, 6, size=(9, 3)), jnp.int32)
  weights = jnp.asarray(rng.uniform(0.1, 1.0, size=(9, 3)), jnp.float32)
  rows, _, sort_map = reference.permute(x, indices, 6)
  y = reference.unpermute(rows * 2.0, sort_map, weights)  # "expert" = doubling
  np.testing.assert_allclose(y, 2.0 * np.asarray(weights).sum(-1, keepdims=True) * np.asarray(x),
                             rtol=1e-6)


def test_grouped_matmul_multiplies_each_group_by_its_matrix(rng):
  lhs = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(3, 4, 2)), jnp.float32)
  sizes = np.array([3, 0, 5])  # the last 2 rows belong to no group
  with jax.default_matmul_precision("highest"):  # GPUs default to TF32 for float32 matmuls
    out = reference.grouped_matmul(lhs, rhs, jnp.asarray(sizes, jnp.int32))
  group_of_row = np.repeat(np.arange(3), sizes)
  want = np.zeros((10, 2))
  want[:8] = np.einsum("mk,mkn->mn", np.asarray(lhs)[:8], np.asarray(rhs)[group_of_row])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
