"""Tests of jax_moe.route (SPEC §1, §4) against the float64 NumPy reference in np_reference.py.

Inputs are random and not monotone in the expert index. Index comparisons are exact on every row whose
decisive comparisons are farther apart than float32 rounding can bridge (np_reference.is_unambiguous);
exact ties are built from exactly representable values and are always compared.
"""
import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_moe
import np_reference as npr

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
DTYPES = {"f32": F32, "bf16": BF16, "f16": F16}

MODES = {
    "softmax_post": dict(score_function="softmax"),
    "softmax_pre": dict(score_function="softmax", use_pre_softmax=True),
    "sigmoid": dict(score_function="sigmoid"),
    "sqrtsoftplus": dict(score_function="sqrtsoftplus"),
}
DEEPSEEK_V3 = dict(score_function="sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5)
DEEPSEEK_V3_E, DEEPSEEK_V3_K = 256, 8

# topk_reduce_func in JAX and its NumPy counterpart.
REDUCES = {
    "sum_plus_eps": (lambda v: jnp.sum(v, -1, keepdims=True) + 1e-20, npr.SUM_PLUS_EPS),
    "max": (lambda v: jnp.max(v, -1, keepdims=True), npr.MAX),
}

WEIGHT_RTOL = 1e-5
WEIGHT_ATOL = 1e-8  # only matters for weights that are (nearly) zero, e.g. sigmoid(-inf)
# float32 has no relative precision below its smallest normal (1.2e-38), and GPUs flush to zero there.
GRAD_ATOL = 1e-36


# ----------------------------------------------------------------------------------------- inputs

def random_logits(rng, shape, dtype=F32, scale=1.0):
  """Normal logits with a random shift per row, rounded to `dtype`.

  A scale near 1 keeps sigmoid scores off saturation, where float32 could not separate them.
  """
  shift = rng.uniform(-1, 1, size=shape[:-1] + (1,))
  return jnp.asarray(rng.normal(size=shape) * scale + shift, dtype)


def random_bias(rng, num_experts, mode, dtype=F32):
  """A bias comparable to the selection scores of `mode`, so that it changes which experts win."""
  scale = {"softmax_post": 1.0, "softmax_pre": 1.0 / num_experts, "sigmoid": 0.1,
           "sqrtsoftplus": 0.3}[mode]
  return jnp.asarray(rng.normal(size=num_experts) * scale, dtype)


def num_tokens_for(num_experts):
  """An odd token count keeping each case around 2^17 logits (E=8192 still gets 17 rows)."""
  return min(301, 2**17 // num_experts) | 1


# ------------------------------------------------------------------------------------- comparison

def route_and_reference(logits, topk, *, reduce=None, **config):
  """jax_moe.route and the float64 reference on the same inputs; `reduce` names a REDUCES entry."""
  jax_reduce, np_reduce = REDUCES[reduce] if reduce else (None, None)
  out = jax_moe.route(logits, topk, topk_reduce_func=jax_reduce, **config)
  ref = npr.route(logits, topk, topk_reduce_func=np_reduce, **config)
  return out, ref


def _describe_rows(rows, got, want):
  return "; ".join(f"row {r}: got {got[r].tolist()} want {want[r].tolist()}" for r in rows[:3])


def assert_valid_routing(out, lead_shape, topk, num_experts):
  """Shapes, dtypes, and k distinct in-range experts per row (SPEC §1.4), on every row."""
  assert isinstance(out, jax_moe.Routing)
  assert out.weights.shape == (*lead_shape, topk) and out.weights.dtype == F32
  assert out.indices.shape == (*lead_shape, topk) and out.indices.dtype == jnp.int32
  idx = np.asarray(out.indices).reshape(-1, topk)
  assert ((idx >= 0) & (idx < num_experts)).all(), "indices out of [0, E)"
  distinct = np.sort(idx, -1)
  assert (distinct[:, 1:] != distinct[:, :-1]).all(), "repeated expert in a row"


def assert_matches_reference(out, ref, logits, topk, *, rtol=WEIGHT_RTOL, min_decided=0.5):
  """Indices exactly and weights within rtol (NaN where the reference is NaN) on unambiguous rows."""
  assert_valid_routing(out, logits.shape[:-1], topk, logits.shape[-1])
  got_idx = np.asarray(out.indices).reshape(-1, topk)
  got_w = np.asarray(out.weights, np.float64).reshape(-1, topk)
  decided = npr.is_unambiguous(ref.margin)
  if decided.size:
    assert decided.mean() >= min_decided, f"only {decided.mean():.0%} of rows are unambiguous"
  wrong = np.nonzero(decided & (got_idx != ref.indices).any(-1))[0]
  assert not wrong.size, f"{wrong.size} rows with wrong indices: " + _describe_rows(
      wrong, got_idx, ref.indices)
  np.testing.assert_allclose(got_w[decided], ref.weights[decided], rtol=rtol, atol=WEIGHT_ATOL)


def check_route(logits, topk, *, rtol=WEIGHT_RTOL, **config):
  out, ref = route_and_reference(logits, topk, **config)
  assert_matches_reference(out, ref, logits, topk, rtol=rtol)
  return out


def softmax_rtol(num_experts):
  # A softmax accumulates E float32 terms; allow the error to grow like sqrt(E) past 1024 experts.
  return WEIGHT_RTOL * max(1.0, (num_experts / 1024) ** 0.5)


# ------------------------------------------------------------------------------------ forward

def test_routing_is_a_namedtuple_pytree(rng):
  out = jax_moe.route(random_logits(rng, (5, 16)), 3)
  weights, indices = out
  assert out._fields == ("weights", "indices")
  assert weights is out.weights and indices is out.indices
  assert len(jax.tree_util.tree_leaves(out)) == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_deepseek_v3_config(rng, dtype):
  logits = random_logits(rng, (513, DEEPSEEK_V3_E), DTYPES[dtype])
  bias = random_bias(rng, DEEPSEEK_V3_E, "sigmoid")
  check_route(logits, DEEPSEEK_V3_K, expert_bias=bias, **DEEPSEEK_V3)


SCORE_CASES = [(8, 1), (8, 2), (8, 8), (130, 4), (256, 8), (256, 40), (1024, 1), (1024, 8),
               (1024, 40), (8192, 2), (8192, 8), (8192, 40)]


@pytest.mark.parametrize("num_experts,topk", SCORE_CASES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_score_functions(rng, mode, num_experts, topk):
  logits = random_logits(rng, (num_tokens_for(num_experts), num_experts))
  check_route(logits, topk, rtol=softmax_rtol(num_experts), **MODES[mode])


@pytest.mark.parametrize("num_experts,topk", [(64, 4), (256, 8), (1024, 40)], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_expert_bias_changes_selection_only(rng, mode, num_experts, topk):
  logits = random_logits(rng, (num_tokens_for(num_experts), num_experts))
  bias = random_bias(rng, num_experts, mode)
  out = check_route(logits, topk, expert_bias=bias, **MODES[mode])
  unbiased = jax_moe.route(logits, topk, **MODES[mode])
  assert (np.asarray(out.indices) != np.asarray(unbiased.indices)).any(), "bias chose nothing else"


GROUP_CASES = {  # num_experts, num_groups, group_topk, topk, group_score_topn
    "dsv3_default_topn": (256, 8, 4, 8, None),
    "dsv2_max": (256, 8, 4, 8, 1),
    "topn3": (256, 8, 4, 8, 3),
    "k_not_multiple_of_groups": (64, 8, 3, 5, None),
    "k_not_multiple_topn3": (64, 8, 3, 7, 3),
    "ten_groups": (160, 10, 2, 9, None),
    "large_k": (1024, 16, 4, 40, None),
    "k_fills_kept_groups": (128, 4, 1, 32, None),
}


@pytest.mark.parametrize("case", GROUP_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_group_limited_routing(rng, mode, case):
  num_experts, num_groups, group_topk, topk, topn = GROUP_CASES[case]
  logits = random_logits(rng, (num_tokens_for(num_experts), num_experts))
  bias = random_bias(rng, num_experts, mode)
  check_route(logits, topk, expert_bias=bias, num_groups=num_groups, group_topk=group_topk,
              group_score_topn=topn, **MODES[mode])


@pytest.mark.parametrize("bias_dtype", DTYPES)
@pytest.mark.parametrize("logits_dtype", DTYPES)
def test_logits_and_bias_dtypes(rng, logits_dtype, bias_dtype):
  # The reference reads the same rounded values in float64, so only float32 kernel math differs.
  logits = random_logits(rng, (257, 64), DTYPES[logits_dtype])
  bias = random_bias(rng, 64, "sigmoid", DTYPES[bias_dtype])
  check_route(logits, 6, expert_bias=bias, score_function="sigmoid", num_groups=4, group_topk=2)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_logits(rng, mode, dtype):
  logits = random_logits(rng, (301, 128), DTYPES[dtype])
  check_route(logits, 8, **MODES[mode])


# Sigmoid is left out: above ~17 every score rounds to 1.0 in float32, so nothing is decided.
@pytest.mark.parametrize("mode", ["softmax_post", "softmax_pre", "sqrtsoftplus"])
def test_large_logits(rng, mode):
  # Logits far past softplus' x > 20 branch, where exp(x) overflows float32.
  logits = random_logits(rng, (101, 64), scale=20.0) + 70.0
  cot = jnp.asarray(rng.normal(size=(101, 4)), F32)
  check_route(logits, 4, **MODES[mode])
  grad = weighted_sum_grad(logits, cot, 4, **MODES[mode])
  assert_grad_matches_reference(grad, logits, cot, 4, **MODES[mode])


def test_leading_batch_dims(rng):
  logits = random_logits(rng, (2, 3, 64))
  bias = random_bias(rng, 64, "sigmoid")
  out = check_route(logits, 4, expert_bias=bias, score_function="sigmoid")
  assert out.weights.shape == (2, 3, 4)


def test_single_token_without_leading_dims(rng):
  check_route(random_logits(rng, (130,)), 5, score_function="sqrtsoftplus")


@pytest.mark.parametrize("mode", MODES)
def test_no_tokens(mode):
  out = jax_moe.route(jnp.ones((0, 32), F32), 4, **MODES[mode])
  assert_valid_routing(out, (0,), 4, 32)
  grad = jax.grad(lambda x: jax_moe.route(x, 4, **MODES[mode]).weights.sum())(jnp.ones((0, 32)))
  assert grad.shape == (0, 32)


# ------------------------------------------------------------------------------ ties and specials

TIE_VALUES = (-1.25, 0.5, 1.0, 2.0)  # exact in every dtype; no two pairs have equal sigmoid sums


def tied_logits(rng, shape, dtype=F32):
  return jnp.asarray(rng.choice(TIE_VALUES, size=shape), dtype)


def assert_has_ties_at_the_cut(logits, topk):
  # Guards against a tie test that tests no tie: some row must tie across the k-th position.
  x = np.sort(np.asarray(logits, np.float64), -1)[..., ::-1]
  assert (x[..., topk - 1] == x[..., topk]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_exact_ties_go_to_the_lower_index(rng, mode, dtype):
  logits = tied_logits(rng, (203, 64), DTYPES[dtype])
  assert_has_ties_at_the_cut(logits, 6)
  check_route(logits, 6, **MODES[mode])


# group_score_topn 3 only where z = logits: sums of exact values are exact in any order.
@pytest.mark.parametrize("mode,topn", [(m, None) for m in MODES] + [("softmax_post", 3)])
def test_exact_ties_between_groups(rng, mode, topn):
  logits = tied_logits(rng, (203, 64))
  check_route(logits, 6, num_groups=8, group_topk=3, group_score_topn=topn, **MODES[mode])


def test_exact_ties_with_bias(rng):
  # z = x + b is exact for these values, so biased ties are exact ties too.
  logits = tied_logits(rng, (203, 64))
  bias = jnp.asarray(rng.choice((-0.5, 0.25, 0.5), size=64), F32)
  check_route(logits, 6, expert_bias=bias, num_groups=4, group_topk=2)


# From 4096 tokens on, the CUDA forward routes four tokens per warp and picks its top-k threshold
# another way (routing_cuda.cu, kWideTokens): the results must not change. DeepSeek-V3's compiled-in
# kernel keeps a warp a token up to 48 tokens an SM (wide_tokens: 6336 tokens on an H100 or H200), so
# its four-token layout needs more tokens. There its 16-bit rows take a kernel of their own
# (route_deepseek_v3_kernel), every warp one set of four tokens, in as many waves as it takes; its f32
# kernel keeps one resident wave (16896 tokens on an H100), past which the warps loop over sets.
MANY_TOKENS = 4099
DEEPSEEK_V3_MANY_TOKENS = 8195
DEEPSEEK_V3_LOOPING_TOKENS = 20003


@pytest.mark.parametrize("tokens", [MANY_TOKENS, DEEPSEEK_V3_MANY_TOKENS, DEEPSEEK_V3_LOOPING_TOKENS])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_many_tokens_deepseek_v3(rng, dtype, tokens):
  logits = random_logits(rng, (tokens, DEEPSEEK_V3_E), DTYPES[dtype])
  check_route(logits, DEEPSEEK_V3_K, expert_bias=random_bias(rng, DEEPSEEK_V3_E, "sigmoid"), **DEEPSEEK_V3)


@pytest.mark.parametrize("mode", ["softmax_post", "softmax_pre"])
def test_many_tokens_softmax(rng, mode):
  check_route(random_logits(rng, (MANY_TOKENS, 128)), 8, **MODES[mode])


# 16-bit rows of DeepSeek-V3's shape (groups, 2 * group_topk >= k, no padding) select on float values there,
# rows with a NaN on keys: ties, NaN and infinities must come out as SPEC §1.4 orders them either way.
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_many_tokens_exact_ties_with_groups(rng, mode, dtype):
  logits = tied_logits(rng, (MANY_TOKENS, 64), DTYPES[dtype])
  assert_has_ties_at_the_cut(logits, 6)
  check_route(logits, 6, num_groups=8, group_topk=3, **MODES[mode])


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_many_tokens_nan_and_inf_rows_with_groups(rng, mode, dtype):
  logits = np.asarray(random_logits(rng, (MANY_TOKENS, 64)), np.float64)
  special = non_finite_rows(rng, 64)
  rows = rng.choice(MANY_TOKENS, 40, replace=False)  # most warps of 4 tokens see no NaN
  logits[rows] = special[np.arange(40) % len(special)]
  check_route(jnp.asarray(logits, DTYPES[dtype]), 8, expert_bias=random_bias(rng, 64, mode), num_groups=8,
              group_topk=4, **MODES[mode])


@pytest.mark.parametrize("grouped", [False, True])
def test_negative_zero_ties_positive_zero(rng, grouped):
  # Negative logits with six signed zeros per row: the zeros are the best and tie whatever their sign.
  logits = -np.abs(rng.normal(size=(101, 32))) - 0.5
  for row in logits:
    row[rng.choice(32, 6, replace=False)] = rng.choice((-0.0, 0.0), size=6)
  groups = dict(num_groups=4, group_topk=2) if grouped else {}
  out = check_route(jnp.asarray(logits, F32), 4, **groups)
  assert np.signbit(logits[np.arange(101)[:, None], np.asarray(out.indices)]).any()


def _row_with(rng, num_experts, **counts):
  """A random finite row with `counts` entries (name -> how many) of nan / neg_inf / pos_inf."""
  row = rng.normal(size=num_experts) * 1.5
  special = {"nan": np.nan, "neg_inf": -np.inf, "pos_inf": np.inf}
  positions = rng.permutation(num_experts)
  start = 0
  for name, count in counts.items():
    row[positions[start:start + count]] = special[name]
    start += count
  return row


def non_finite_rows(rng, num_experts):
  return np.stack([
      _row_with(rng, num_experts, nan=1),
      _row_with(rng, num_experts, nan=3),
      _row_with(rng, num_experts, neg_inf=5),
      _row_with(rng, num_experts, neg_inf=num_experts),
      _row_with(rng, num_experts, pos_inf=1),
      _row_with(rng, num_experts, pos_inf=2, neg_inf=3),
      _row_with(rng, num_experts, nan=2, neg_inf=4),
      # Fewer than k finite values: -inf ranks next, then NaN.
      _row_with(rng, num_experts, neg_inf=num_experts - 6, nan=4),
      _row_with(rng, num_experts, nan=num_experts),
      _row_with(rng, num_experts),
  ])


@pytest.mark.parametrize("topk", [1, 4])
@pytest.mark.parametrize("mode", MODES)
def test_nan_and_inf_rows(rng, mode, topk):
  logits = jnp.asarray(non_finite_rows(rng, 16), F32)
  check_route(logits, topk, **MODES[mode])


@pytest.mark.parametrize("mode", MODES)
def test_nan_and_inf_rows_with_groups_and_bias(rng, mode):
  logits = jnp.asarray(non_finite_rows(rng, 32), F32)
  check_route(logits, 4, expert_bias=random_bias(rng, 32, mode), num_groups=4, group_topk=2,
              **MODES[mode])


# DeepSeek-V3's exact config and Qwen3-MoE's router shape (128 experts, softmax, top 8, after the default
# post-softmax) run kernels compiled for them (routing_cuda.cu, kFixedRoute), at 32 lanes a token for few
# tokens and 8 for many (DeepSeek-V3 from more tokens than Qwen3, see above): tied logits with a bias of
# three values (so that z ties too) and without, and NaN / infinite rows, in every logits dtype at each
# layout (DeepSeek-V3: one wave and several; f32 rows in looping warps).
QWEN3_E, QWEN3_K = 128, 8
COMPILED_CONFIGS = {  # E, topk, config, the selection score of a logit (before the bias), token counts
    "deepseek_v3": (DEEPSEEK_V3_E, DEEPSEEK_V3_K, DEEPSEEK_V3, lambda x: 1 / (1 + np.exp(-x)),
                    (203, DEEPSEEK_V3_MANY_TOKENS, DEEPSEEK_V3_LOOPING_TOKENS)),
    "qwen3": (QWEN3_E, QWEN3_K, MODES["softmax_post"], lambda x: x, (203, MANY_TOKENS)),
}
COMPILED_CONFIG_CASES = [(name, tokens) for name, c in COMPILED_CONFIGS.items() for tokens in c[4]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,tokens", COMPILED_CONFIG_CASES)
def test_compiled_config_ties_and_non_finite_rows(rng, name, tokens, dtype):
  experts, topk, config, score, _ = COMPILED_CONFIGS[name]
  logits = np.asarray(tied_logits(rng, (tokens, experts)), np.float64)
  bias = rng.choice((-0.25, 0.0, 0.25), size=experts)
  z = np.sort(score(logits) + bias, -1)[:, ::-1]
  assert (z[:, topk - 1] == z[:, topk]).any()
  rows = rng.choice(tokens, 40, replace=False)
  special = non_finite_rows(rng, experts)
  logits[rows] = special[np.arange(40) % len(special)]
  x = jnp.asarray(logits, DTYPES[dtype])
  check_route(x, topk, expert_bias=jnp.asarray(bias, F32), **config)
  check_route(x, topk, **config)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qwen3_router_gradient(rng, dtype):
  logits = random_logits(rng, (67, QWEN3_E), DTYPES[dtype])
  cot = jnp.asarray(rng.normal(size=(67, QWEN3_K)), F32)
  config = dict(MODES["softmax_post"], expert_bias=random_bias(rng, QWEN3_E, "softmax_post"))
  grad = weighted_sum_grad(logits, cot, QWEN3_K, **config)
  assert_grad_matches_reference(grad, logits, cot, QWEN3_K, rtol=1e-4 if dtype == "f32" else 1e-2, **config)


def test_nan_row_keeps_softmax_pre_weights_visible(rng):
  # SPEC §1.4: a NaN makes the whole softmax row NaN, so experts 0..k-1 are chosen with NaN weights.
  logits = random_logits(rng, (3, 16)).at[:, 7].set(jnp.nan)
  out = jax_moe.route(logits, 3, score_function="softmax", use_pre_softmax=True)
  np.testing.assert_array_equal(np.asarray(out.indices), np.tile(np.arange(3), (3, 1)))
  assert np.isnan(np.asarray(out.weights)).all()


# ---------------------------------------------------------------------------------------- gradients

GRAD_CASES = {  # mode, topk, extra config, topk_reduce_func name
    "softmax_post": ("softmax_post", 4, {}, None),
    "softmax_post_scaled": ("softmax_post", 4, dict(renormalize=False, scaling_factor=2.5), None),
    "softmax_post_k1": ("softmax_post", 1, {}, None),
    "softmax_pre": ("softmax_pre", 4, {}, None),
    "softmax_pre_renorm": ("softmax_pre", 4, dict(renormalize=True), None),
    "softmax_pre_reduce_max": ("softmax_pre", 4, dict(renormalize=True), "max"),
    "sigmoid": ("sigmoid", 4, {}, None),
    "sigmoid_no_renorm": ("sigmoid", 4, dict(renormalize=False, scaling_factor=2.5), None),
    "sigmoid_k1": ("sigmoid", 1, {}, None),
    "sigmoid_reduce_sum": ("sigmoid", 4, dict(scaling_factor=2.5), "sum_plus_eps"),
    "sigmoid_reduce_max": ("sigmoid", 4, {}, "max"),
    "sqrtsoftplus": ("sqrtsoftplus", 4, {}, None),
    "sqrtsoftplus_no_renorm": ("sqrtsoftplus", 4, dict(renormalize=False), None),
    "sqrtsoftplus_reduce_sum": ("sqrtsoftplus", 4, dict(scaling_factor=2.5), "sum_plus_eps"),
    "deepseek_v3": ("sigmoid", 8, dict(num_groups=8, group_topk=4, scaling_factor=2.5), None),
}


def weighted_sum_grad(logits, cot, topk, reduce=None, **config):
  jax_reduce = REDUCES[reduce][0] if reduce else None

  def loss(x):
    return jnp.sum(jax_moe.route(x, topk, topk_reduce_func=jax_reduce, **config).weights * cot)
  return jax.grad(loss)(logits)


def assert_grad_matches_reference(grad, logits, cot, topk, reduce=None, rtol=1e-4, **config):
  """Within rtol of the reference's error scale, on the rows whose chosen set is unambiguous."""
  np_config = dict(config, topk_reduce_func=REDUCES[reduce][1] if reduce else None)
  want = npr.route_vjp(logits, topk, cot, **np_config)
  # The backward subtracts (g_i - sum g p); its float32 error scales with the terms, not the result.
  scale = npr.route_vjp(logits, topk, cot, magnitude=True, **np_config)
  decided = npr.is_unambiguous(npr.route(logits, topk, **np_config).margin)
  assert grad.shape == logits.shape and grad.dtype == logits.dtype
  error = np.abs(np.asarray(grad, np.float64) - want).reshape(-1, logits.shape[-1])
  bound = rtol * scale.reshape(error.shape) + GRAD_ATOL
  bad = np.nonzero(decided[:, None] & ~(error <= bound))
  assert not bad[0].size, (f"{bad[0].size} gradient entries off, first at (row, expert) "
                           f"{bad[0][0], bad[1][0]}: error {error[bad][0]:.3g} > {bound[bad][0]:.3g}")


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradient_matches_reference(rng, case):
  mode, topk, extra, reduce = GRAD_CASES[case]
  num_experts = 256 if "num_groups" in extra else 48
  logits = random_logits(rng, (67, num_experts))
  cot = jnp.asarray(rng.normal(size=(67, topk)), F32)
  bias = random_bias(rng, num_experts, mode)
  config = dict(MODES[mode], expert_bias=bias, **extra)
  grad = weighted_sum_grad(logits, cot, topk, reduce, **config)
  assert_grad_matches_reference(grad, logits, cot, topk, reduce, **config)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_gradient_of_half_precision_logits(rng, dtype):
  # The gradient comes back in the logits' dtype; it matches the reference up to that rounding.
  logits = random_logits(rng, (67, 256), DTYPES[dtype])
  cot = jnp.asarray(rng.normal(size=(67, 8)), F32)
  config = dict(DEEPSEEK_V3, expert_bias=random_bias(rng, 256, "sigmoid"))
  grad = weighted_sum_grad(logits, cot, 8, **config)
  assert_grad_matches_reference(grad, logits, cot, 8, rtol=1e-2, **config)


@pytest.mark.parametrize("bias_dtype", DTYPES)
def test_expert_bias_gets_zero_gradient(rng, bias_dtype):
  logits = random_logits(rng, (33, 64))
  bias = random_bias(rng, 64, "sigmoid", DTYPES[bias_dtype])
  cot = jnp.asarray(rng.normal(size=(33, 4)), F32)

  def loss(x, b):
    return jnp.sum(jax_moe.route(x, 4, score_function="sigmoid", expert_bias=b).weights * cot)
  grad_bias = jax.grad(loss, argnums=1)(logits, bias)
  assert grad_bias.shape == (64,) and grad_bias.dtype == bias.dtype
  assert not np.asarray(grad_bias).any()


def test_indices_carry_no_derivative(rng):
  # Integer outputs take float0 cotangents, and the gradient is that of the weights alone.
  logits = random_logits(rng, (9, 32))
  cot = jnp.asarray(rng.normal(size=(9, 4)), F32)
  out, vjp = jax.vjp(lambda x: jax_moe.route(x, 4, score_function="sigmoid"), logits)
  (grad,) = vjp(jax_moe.Routing(cot, np.zeros(out.indices.shape, jax.dtypes.float0)))
  np.testing.assert_allclose(grad, weighted_sum_grad(logits, cot, 4, score_function="sigmoid"),
                             rtol=1e-6)


# ---------------------------------------------------------------------------------- transformations

def test_jit_matches_eager(rng):
  logits = random_logits(rng, (45, 256), BF16)
  bias = random_bias(rng, 256, "sigmoid")
  route = functools.partial(jax_moe.route, topk=8, **DEEPSEEK_V3)
  eager = route(logits, expert_bias=bias)
  jitted = jax.jit(route)(logits, expert_bias=bias)
  np.testing.assert_array_equal(jitted.indices, eager.indices)
  np.testing.assert_array_equal(jitted.weights, eager.weights)


def _route_each(logits_slices, biases, topk, **config):
  outs = [jax_moe.route(x, topk, expert_bias=b, **config) for x, b in zip(logits_slices, biases)]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *outs)


def assert_routings_equal(got, want, rtol=1e-6):
  np.testing.assert_array_equal(got.indices, want.indices)
  np.testing.assert_allclose(got.weights, want.weights, rtol=rtol)


@pytest.mark.parametrize("in_axis", [0, 1])
def test_vmap_with_shared_bias(rng, in_axis):
  logits = random_logits(rng, (3, 17, 64))           # [B, T, E]
  bias = random_bias(rng, 64, "sigmoid")
  config = dict(score_function="sigmoid", num_groups=4, group_topk=2)
  batched = jax.vmap(lambda x: jax_moe.route(x, 6, expert_bias=bias, **config),
                     in_axes=in_axis)(jnp.moveaxis(logits, 0, in_axis))
  assert_routings_equal(batched, _route_each(logits, [bias] * 3, 6, **config))


def test_vmap_with_batched_bias(rng):
  logits = random_logits(rng, (3, 17, 64))
  biases = jnp.stack([random_bias(rng, 64, "sigmoid") for _ in range(3)])
  config = dict(score_function="sigmoid", num_groups=4, group_topk=2)
  batched = jax.vmap(lambda x, b: jax_moe.route(x, 6, expert_bias=b, **config))(logits, biases)
  assert_routings_equal(batched, _route_each(logits, biases, 6, **config))
  check_route(logits[1], 6, expert_bias=biases[1], **config)


def test_vmap_of_grad(rng):
  logits = random_logits(rng, (3, 17, 64))
  cot = jnp.asarray(rng.normal(size=(3, 17, 4)), F32)
  grad = functools.partial(weighted_sum_grad, topk=4, score_function="sqrtsoftplus")
  batched = jax.vmap(grad)(logits, cot)
  each = jnp.stack([grad(x, c) for x, c in zip(logits, cot)])
  np.testing.assert_allclose(batched, each, rtol=1e-6, atol=1e-9)


def test_jit_of_grad_with_bias(rng):
  logits = random_logits(rng, (31, 256))
  cot = jnp.asarray(rng.normal(size=(31, 8)), F32)
  config = dict(DEEPSEEK_V3, expert_bias=random_bias(rng, 256, "sigmoid"))
  grad = jax.jit(functools.partial(weighted_sum_grad, topk=8, **config))(logits, cot)
  assert_grad_matches_reference(grad, logits, cot, 8, **config)


def four_device_mesh():
  if len(jax.devices()) < 4:
    pytest.skip(f"needs 4 devices, {jax.devices()[0].platform} has {len(jax.devices())}")
  return Mesh(np.array(jax.devices()[:4]), ("x",))


def test_shard_map_over_tokens(rng):
  mesh = four_device_mesh()
  logits = random_logits(rng, (4 * 33, 256), BF16)
  bias = random_bias(rng, 256, "sigmoid")
  route = functools.partial(jax_moe.route, topk=8, **DEEPSEEK_V3)
  sharded = jax.jit(jax.shard_map(lambda x, b: route(x, expert_bias=b), mesh=mesh,
                                  in_specs=(P("x", None), P()), out_specs=P("x", None)))
  assert_routings_equal(sharded(logits, bias), route(logits, expert_bias=bias))


def _sharded_inputs(rng, mesh):
  logits = random_logits(rng, (4 * 33, 256), BF16)
  bias = random_bias(rng, 256, "sigmoid")
  cot = jnp.asarray(rng.normal(size=(4 * 33, 8)), F32)
  tokens = NamedSharding(mesh, P("x", None))
  return (logits, bias, cot), (jax.device_put(logits, tokens), jax.device_put(bias, NamedSharding(
      mesh, P())), jax.device_put(cot, tokens))


def test_jit_with_token_sharded_logits_needs_no_all_gather(rng):
  mesh = four_device_mesh()
  (logits, bias, _), (s_logits, s_bias, _) = _sharded_inputs(rng, mesh)
  route = jax.jit(functools.partial(jax_moe.route, topk=8, **DEEPSEEK_V3))
  assert_routings_equal(route(s_logits, expert_bias=s_bias), route(logits, expert_bias=bias))
  hlo = route.lower(s_logits, expert_bias=s_bias).compile().as_text()
  assert "all-gather" not in hlo


def test_grad_with_token_sharded_logits_needs_no_all_gather(rng):
  mesh = four_device_mesh()
  (logits, bias, cot), (s_logits, s_bias, s_cot) = _sharded_inputs(rng, mesh)
  grad = jax.jit(functools.partial(weighted_sum_grad, topk=8, expert_bias=s_bias, **DEEPSEEK_V3))
  unsharded = weighted_sum_grad(logits, cot, 8, expert_bias=bias, **DEEPSEEK_V3)
  np.testing.assert_allclose(grad(s_logits, s_cot), unsharded, rtol=1e-6)
  assert "all-gather" not in grad.lower(s_logits, s_cot).compile().as_text()


# ------------------------------------------------------------------------- compiled graph (HLO)

class HloInstruction(NamedTuple):
  opcode: str
  operands: tuple
  line: str


_COMPUTATION_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|\s)([a-z][a-z0-9\-]*)\(")
_NAME = re.compile(r"%?([A-Za-z_][\w.\-]*)")
# Ops that only move or reinterpret bytes: a value reaching the kernel through them is unconverted.
PASS_THROUGH = {"bitcast", "copy", "reshape"}


def _call_arguments(text, open_paren):
  depth = 0
  for pos in range(open_paren, len(text)):
    depth += {"(": 1, ")": -1}.get(text[pos], 0)
    if depth == 0:
      return text[open_paren + 1:pos], text[pos + 1:]
  raise ValueError(f"unbalanced parentheses in {text!r}")


class HloModule:
  """Just enough of XLA's HLO text to follow values from the entry parameters to an instruction."""

  def __init__(self, text):
    self.computations, self.roots, self.entry, current = {}, {}, None, None
    for line in text.splitlines():
      header = _COMPUTATION_HEADER.match(line)
      if header and " = " not in line:
        current = header.group(2)
        self.computations[current] = {}
        self.entry = current if header.group(1) else self.entry
        continue
      instruction = _INSTRUCTION.match(line)
      if current is None or not instruction:
        continue
      name, rest = instruction.groups()
      opcode = _OPCODE.search(rest)
      args, _ = _call_arguments(rest, opcode.end() - 1)
      self.computations[current][name] = HloInstruction(
          opcode.group(1), tuple(_NAME.findall(args)), line)
      if line.lstrip().startswith("ROOT"):
        self.roots[current] = name
    assert self.entry, "no ENTRY computation found"

  def instructions(self):
    for computation, body in self.computations.items():
      for name, instruction in body.items():
        yield computation, name, instruction

  def _callers(self, callee):
    target = re.compile(rf"(calls|to_apply)=\{{?%?{re.escape(callee)}(?![\w.\-])")
    return [(c, i) for c, _, i in self.instructions() if target.search(i.line)]

  def origins(self, computation, name):
    """What a value is made from, looking through PASS_THROUGH ops and call boundaries.

    Returns a set of ("parameter", entry parameter number) and (opcode, name) for any other op.
    """
    instruction = self.computations[computation][name]
    if instruction.opcode in PASS_THROUGH:
      return self.operand_origins(computation, instruction)
    if instruction.opcode == "fusion":
      # A fusion made only of PASS_THROUGH ops (e.g. a layout copy) leads back to its operands.
      fused = re.search(r"calls=%?([\w.\-]+)", instruction.line).group(1)
      inner = self.origins(fused, self.roots[fused])
      if all(kind == "parameter" for kind, _ in inner):
        return inner
      return {("fusion", name)}
    if instruction.opcode != "parameter":
      return {(instruction.opcode, name)}
    number = int(re.search(r"parameter\((\d+)\)", instruction.line).group(1))
    if computation == self.entry:
      return {("parameter", number)}
    found = set()
    for caller_computation, caller in self._callers(computation):
      operands = [o for o in caller.operands if o in self.computations[caller_computation]]
      found |= self.origins(caller_computation, operands[number])
    return found

  def operand_origins(self, computation, instruction):
    body = self.computations[computation]
    return set().union(*(self.origins(computation, o) for o in instruction.operands if o in body))


def assert_inputs_reach_kernel_unconverted(hlo_text, parameters):
  """Every entry parameter in `parameters` feeds a jax_moe_ custom-call through PASS_THROUGH ops only,
  and no convert anywhere in the module reads one of them."""
  module = HloModule(hlo_text)
  kernels = [(c, i) for c, _, i in module.instructions()
             if i.opcode == "custom-call" and re.search(r'custom_call_target="jax_moe_', i.line)]
  assert kernels, "no jax_moe_ custom-call in the compiled module"
  fed = set().union(*(module.operand_origins(c, i) for c, i in kernels))
  for number in parameters:
    assert ("parameter", number) in fed, f"parameter {number} reaches the kernel through {fed}"
  for computation, name, instruction in module.instructions():
    if instruction.opcode == "convert":
      converted = module.operand_origins(computation, instruction)
      assert not converted & {("parameter", n) for n in parameters}, instruction.line


@pytest.mark.parametrize("logits_dtype,bias_dtype", [("bf16", "f32"), ("f32", "bf16"),
                                                     ("f16", "bf16"), ("bf16", "bf16")])
def test_bias_and_logits_reach_the_kernel_without_convert(rng, logits_dtype, bias_dtype):
  logits = random_logits(rng, (64, 256), DTYPES[logits_dtype])
  bias = random_bias(rng, 256, "sigmoid", DTYPES[bias_dtype])
  route = jax.jit(functools.partial(jax_moe.route, topk=8, **DEEPSEEK_V3))
  hlo = route.lower(logits, expert_bias=bias).compile().as_text()
  assert_inputs_reach_kernel_unconverted(hlo, parameters=(0, 1))


# ------------------------------------------------------------------------ routing_map / dense_weights

def test_routing_map_and_dense_weights(rng):
  logits = random_logits(rng, (2, 5, 40))
  out = jax_moe.route(logits, 6, score_function="sigmoid")
  routing_map = jax_moe.routing_map(out.indices, 40)
  dense = jax_moe.dense_weights(out.weights, out.indices, 40)
  want_map = np.zeros((2, 5, 40), bool)
  want_dense = np.zeros((2, 5, 40), np.float32)
  np.put_along_axis(want_map, np.asarray(out.indices), True, -1)
  np.put_along_axis(want_dense, np.asarray(out.indices), np.asarray(out.weights), -1)
  assert routing_map.dtype == jnp.bool_ and dense.dtype == F32
  np.testing.assert_array_equal(routing_map, want_map)
  np.testing.assert_array_equal(dense, want_dense)


def test_dense_weights_gradient_flows_to_logits(rng):
  logits = random_logits(rng, (21, 48))
  cot = jnp.asarray(rng.normal(size=(21, 48)), F32)

  def loss(x):
    out = jax_moe.route(x, 4, score_function="sigmoid")
    return jnp.sum(jax_moe.dense_weights(out.weights, out.indices, 48) * cot)
  out = jax_moe.route(logits, 4, score_function="sigmoid")
  cot_at_chosen = jnp.take_along_axis(cot, out.indices, -1)
  assert_grad_matches_reference(jax.grad(loss)(logits), logits, cot_at_chosen, 4,
                                score_function="sigmoid")


# ------------------------------------------------------------------------------------- bad input

def _x(num_experts=64, dtype=F32):
  return jnp.linspace(-3.0, 3.0, 4 * num_experts, dtype=F32).reshape(4, num_experts).astype(dtype)


BAD_CALLS = {  # name: (thunk, the argument the message must name)
    "scalar_logits": (lambda: jax_moe.route(jnp.float32(1.5), 1), "logits"),
    "int_logits": (lambda: jax_moe.route(jnp.arange(64, dtype=jnp.int32).reshape(1, 64), 2), "logits"),
    "topk_above_experts": (lambda: jax_moe.route(_x(8), 9), "topk"),
    "topk_zero": (lambda: jax_moe.route(_x(), 0), "topk"),
    "topk_negative": (lambda: jax_moe.route(_x(), -2), "topk"),
    "topk_float": (lambda: jax_moe.route(_x(), 2.0), "topk"),
    "bias_too_long": (lambda: jax_moe.route(_x(), 2, score_function="sigmoid",
                                            expert_bias=jnp.full(65, 0.5)), "expert_bias"),
    "bias_2d": (lambda: jax_moe.route(_x(), 2, score_function="sigmoid",
                                      expert_bias=jnp.full((1, 64), 0.5)), "expert_bias"),
    "bias_int": (lambda: jax_moe.route(_x(), 2, score_function="sigmoid",
                                       expert_bias=jnp.ones(64, jnp.int32)), "expert_bias"),
    "unknown_score_function": (lambda: jax_moe.route(_x(), 2, score_function="relu"),
                               "score_function"),
    "groups_do_not_divide": (lambda: jax_moe.route(_x(), 2, num_groups=5, group_topk=2),
                             "num_groups"),
    "group_topk_above_groups": (lambda: jax_moe.route(_x(), 2, num_groups=4, group_topk=5),
                                "group_topk"),
    "group_topk_zero": (lambda: jax_moe.route(_x(), 2, num_groups=4, group_topk=0), "group_topk"),
    "groups_without_group_topk": (lambda: jax_moe.route(_x(), 2, num_groups=4), "group_topk"),
    "group_topk_without_groups": (lambda: jax_moe.route(_x(), 2, group_topk=2), "group_topk"),
    "topn_without_groups": (lambda: jax_moe.route(_x(), 2, group_score_topn=2),
                            "group_score_topn"),
    "topn_above_group_size": (lambda: jax_moe.route(_x(), 2, num_groups=4, group_topk=2,
                                                    group_score_topn=17), "group_score_topn"),
    "topn_zero": (lambda: jax_moe.route(_x(), 2, num_groups=4, group_topk=2, group_score_topn=0),
                  "group_score_topn"),
    "topk_above_kept_experts": (lambda: jax_moe.route(_x(), 33, num_groups=4, group_topk=2),
                                "topk"),
    "renormalize_softmax_post": (lambda: jax_moe.route(_x(), 2, renormalize=True), "renormalize"),
    "reduce_softmax_post": (lambda: jax_moe.route(_x(), 2, topk_reduce_func=jnp.max),
                            "topk_reduce_func"),
    "reduce_renormalize_off": (lambda: jax_moe.route(_x(), 2, score_function="sigmoid",
                                                     renormalize=False, topk_reduce_func=jnp.max),
                               "topk_reduce_func"),
    "reduce_renormalize_default_off_k1": (
        lambda: jax_moe.route(_x(), 1, score_function="sigmoid", topk_reduce_func=jnp.max),
        "topk_reduce_func"),
    "reduce_softmax_pre_default_off": (
        lambda: jax_moe.route(_x(), 2, score_function="softmax", use_pre_softmax=True,
                              topk_reduce_func=jnp.max), "topk_reduce_func"),
    "traced_scaling_factor": (
        lambda: jax.jit(lambda x, s: jax_moe.route(x, 2, scaling_factor=s))(_x(), 2.0),
        "scaling_factor"),
    "traced_topk": (lambda: jax.jit(lambda x, k: jax_moe.route(x, k))(_x(), 2), "topk"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_raises_naming_the_argument(case):
  call, argument = BAD_CALLS[case]
  with pytest.raises((ValueError, TypeError), match=re.escape(argument)):
    call()
