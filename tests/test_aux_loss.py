"""Tests of the load-balancing aux loss (SPEC §2, §4) against the float64 NumPy reference in np_aux_reference.py.

Inputs are random and never zero (probs in (0, 1], counts >= 1), so an output element left unwritten or a
term dropped from a sum shows up. Counts are checked exactly against a ranking of the kernel's own float32
scores (the SPEC defines them on those), and against the float64 scores on rows whose k-th and (k+1)-th
scores are farther apart than float32 rounding.
"""
import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_moe
import np_aux_reference as ref
from test_routing import assert_inputs_reach_kernel_unconverted, non_finite_rows

# The module (the package attribute jax_moe.aux_loss is the function of that name).
aux_module = importlib.import_module("jax_moe.aux_loss")

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
DTYPES = {"f32": F32, "bf16": BF16, "f16": F16}
SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
COEFF = 1e-2

# A float32 sum of n terms drifts by about sqrt(n) ulps; the loss sums up to 5e6 products.
LOSS_RTOL = {F32: 2e-5, BF16: 1e-2, F16: 2e-3}  # bf16/f16: the loss is returned in that dtype
GRAD_RTOL = {F32: 1e-6, BF16: 8e-3, F16: 1e-3}


# ----------------------------------------------------------------------------------------- inputs

def random_probs(rng, shape, dtype=F32):
  """Softmax-like rows: positive, never zero, varied."""
  x = rng.uniform(0.05, 1.0, size=shape)
  return jnp.asarray(x / x.sum(-1, keepdims=True), dtype)


def random_counts(rng, n, dtype=jnp.int32):
  return jnp.asarray(rng.integers(1, 1000, size=n), dtype)


def random_logits(rng, shape, dtype=F32, scale=2.0):
  shift = rng.uniform(-1, 1, size=shape[:-1] + (1,))
  return jnp.asarray(rng.normal(size=shape) * scale + shift, dtype)


def f64(x):
  return np.asarray(x, np.float64)


def assert_close(got, want, rtol, atol=0.0):
  np.testing.assert_allclose(f64(got), want, rtol=rtol, atol=atol)


def grad_atol(want, rtol):
  # Entries of a softmax row cancel; measure their error against the largest entry of the row.
  return rtol * np.abs(want).max(-1, keepdims=True)


def assert_grad_close(grad, want, rtol):
  np.testing.assert_array_less(np.abs(f64(grad) - want), grad_atol(want, rtol) + rtol * np.abs(want) + 1e-30)


def four_device_mesh(shape=(4,), names=("x",)):
  if len(jax.devices()) < 4:
    pytest.skip(f"needs 4 devices, {jax.devices()[0].platform} has {len(jax.devices())}")
  return Mesh(np.array(jax.devices()[:4]).reshape(shape), names,
              axis_types=(jax.sharding.AxisType.Auto,) * len(names))


# ------------------------------------------------------------------------------ loss coefficient

def test_loss_coefficient():
  assert jax_moe.loss_coefficient(256, 1e-2, 8, 4096) == pytest.approx(256 * 1e-2 / (8 * 4096**2), rel=1e-15)
  assert jax_moe.loss_coefficient(64, 0.5, 2, 0) == 0.0
  assert isinstance(jax_moe.loss_coefficient(64, 0.5, 2, 3), float)


# ----------------------------------------------------------------------------------- aux_loss

# (E, k, T): every E and k of the brief, T in {1, 333, 4096}, sampled so large E keeps T small.
LOSS_CASES = [(32, 1, 1), (32, 4, 333), (32, 8, 4096), (256, 8, 4096), (256, 1, 333), (1024, 4, 4096),
              (1024, 8, 1), (4096, 8, 333), (4096, 1, 1), (16384, 4, 333), (16384, 8, 1)]


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("num_experts,topk,tokens", LOSS_CASES, ids=str)
def test_aux_loss_matches_reference(rng, num_experts, topk, tokens, dtype):
  dt = DTYPES[dtype]
  probs = random_probs(rng, (tokens, num_experts), dt)
  tpe = random_counts(rng, num_experts)
  loss = jax_moe.aux_loss(probs, tpe, topk=topk, coeff=COEFF)
  assert loss.shape == () and loss.dtype == dt
  assert_close(loss, ref.aux_loss(probs, tpe, topk=topk, coeff=COEFF), LOSS_RTOL[dt])


@pytest.mark.parametrize("cols", [1, 3, 6, 12, 40, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_aux_loss_any_column_count(rng, cols, dtype):
  # Column counts that are not multiples of the kernel's vector width (16 bytes) take narrower vectors.
  dt = DTYPES[dtype]
  probs = random_probs(rng, (77, cols), dt)
  tpe = random_counts(rng, cols)
  loss = jax_moe.aux_loss(probs, tpe, topk=1, coeff=COEFF)
  assert_close(loss, ref.aux_loss(probs, tpe, topk=1, coeff=COEFF), LOSS_RTOL[dt])


@pytest.mark.parametrize("tpe_dtype", [jnp.int32, jnp.int16, jnp.uint8, F32, BF16])
def test_tokens_per_expert_of_any_dtype(rng, tpe_dtype):
  probs = random_probs(rng, (50, 64))
  tpe = random_counts(rng, 64) % 200 + 1
  loss = jax_moe.aux_loss(probs, tpe.astype(tpe_dtype), topk=4, coeff=COEFF)
  assert_close(loss, ref.aux_loss(probs, np.asarray(tpe.astype(tpe_dtype), np.float64), topk=4, coeff=COEFF),
               LOSS_RTOL[F32])


def test_per_sequence_form(rng):
  # C = B·E: the per-sequence loss. E (not C) enters the coefficient.
  num_experts, batch = 64, 2
  probs = random_probs(rng, (333, batch * num_experts))
  tpe = random_counts(rng, batch * num_experts)
  loss = jax_moe.aux_loss(probs, tpe, topk=4, coeff=COEFF, num_experts=num_experts)
  want = ref.aux_loss(probs, tpe, topk=4, coeff=COEFF, num_experts=num_experts)
  assert_close(loss, want, LOSS_RTOL[F32])
  full = jax_moe.aux_loss(probs, tpe, topk=4, coeff=COEFF)
  assert_close(full, want * batch, LOSS_RTOL[F32])
  grad = jax.grad(lambda p: jax_moe.aux_loss(p, tpe, topk=4, coeff=COEFF, num_experts=num_experts))(probs)
  assert_close(grad, ref.aux_loss_grad(probs.shape, tpe, topk=4, coeff=COEFF, num_experts=num_experts),
               GRAD_RTOL[F32])


def test_total_num_tokens_override(rng):
  probs = random_probs(rng, (333, 256))
  tpe = random_counts(rng, 256)
  loss = jax_moe.aux_loss(probs, tpe, topk=8, coeff=COEFF, total_num_tokens=4096)
  assert_close(loss, ref.aux_loss(probs, tpe, topk=8, coeff=COEFF, total_num_tokens=4096), LOSS_RTOL[F32])
  logits = random_logits(rng, (3, 111, 256))
  loss = jax_moe.aux_loss_from_logits(logits, tpe, topk=8, coeff=COEFF, total_num_tokens=4096)
  assert_close(loss, ref.aux_loss_from_logits(logits, tpe, topk=8, coeff=COEFF, total_num_tokens=4096), 1e-5)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("num_experts,tokens", [(32, 333), (1024, 129), (4096, 1)], ids=str)
def test_aux_loss_gradient(rng, num_experts, tokens, dtype):
  dt = DTYPES[dtype]
  probs = random_probs(rng, (tokens, num_experts), dt)
  tpe = random_counts(rng, num_experts)
  loss, grad = jax.value_and_grad(lambda p: jax_moe.aux_loss(p, tpe, topk=8 % num_experts or 1, coeff=COEFF))(probs)
  assert grad.dtype == dt and grad.shape == probs.shape
  want = ref.aux_loss_grad(probs.shape, tpe, topk=8 % num_experts or 1, coeff=COEFF)
  assert_close(grad, want, GRAD_RTOL[dt])


def test_gradient_scales_with_the_cotangent(rng):
  probs = random_probs(rng, (40, 32))
  tpe = random_counts(rng, 32)
  loss, vjp = jax.vjp(lambda p: jax_moe.aux_loss(p, tpe, topk=2, coeff=COEFF), probs)
  (grad,) = vjp(jnp.float32(-2.5))
  assert_close(grad, -2.5 * ref.aux_loss_grad(probs.shape, tpe, topk=2, coeff=COEFF), 1e-6)


def test_tokens_per_expert_gets_no_gradient(rng):
  probs = random_probs(rng, (40, 32))
  tpe = random_counts(rng, 32).astype(F32)
  grad = jax.grad(lambda c: jax_moe.aux_loss(probs, c, topk=2, coeff=COEFF))(tpe)
  assert grad.shape == (32,) and not np.asarray(grad).any()
  logits = random_logits(rng, (40, 32))
  grad = jax.grad(lambda c: jax_moe.aux_loss_from_logits(logits, c, topk=2, coeff=COEFF))(tpe)
  assert not np.asarray(grad).any()


def test_no_tokens():
  tpe = jnp.arange(1, 33)
  for probs in (jnp.zeros((0, 32)), jnp.zeros((0, 32), BF16)):
    loss, grad = jax.value_and_grad(lambda p: jax_moe.aux_loss(p, tpe, topk=4, coeff=COEFF))(probs)
    assert float(loss) == 0.0 and loss.dtype == probs.dtype and grad.shape == (0, 32)
  logits = jnp.zeros((2, 0, 32))
  loss, grad = jax.value_and_grad(lambda x: jax_moe.aux_loss_from_logits(x, tpe, topk=4, coeff=COEFF))(logits)
  assert float(loss) == 0.0 and grad.shape == logits.shape
  scores, counts = jax_moe.aux_loss_scores(logits, 4)
  assert scores.shape == (2, 0, 32) and scores.dtype == F32
  np.testing.assert_array_equal(counts, np.zeros(32, np.int32))


def test_zero_total_num_tokens_gives_zero(rng):
  probs = random_probs(rng, (10, 32))
  loss, grad = jax.value_and_grad(
      lambda p: jax_moe.aux_loss(p, random_counts(rng, 32), topk=4, coeff=COEFF, total_num_tokens=0))(probs)
  assert float(loss) == 0.0 and not np.asarray(grad).any()


# ---------------------------------------------------------------------------- aux_loss backward

def old_dprobs(buf, g, tpe, shape, dtype):
  """The backward as the jnp broadcast it replaced: d probs must match it bit for bit."""
  return jnp.broadcast_to(buf[0] * g * tpe.astype(F32), shape).astype(dtype)


def poison(shape, dtype):
  """Frees a buffer of garbage of the output's size first, so an element left unwritten shows up."""
  jax.block_until_ready(jnp.full(shape, jnp.nan, dtype))


# (T, C): C = E; C = 2E (the per-sequence form); C that is no multiple of the 16-byte vector (130, 37: odd).
BWD_SHAPES = [(333, 64), (129, 128), (77, 130), (50, 37), (4096, 256), (1, 8)]


@pytest.mark.parametrize("tpe_dtype", [jnp.int32, F32])
@pytest.mark.parametrize("tokens,cols", BWD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_kernel_is_the_formula(rng, dtype, tokens, cols, tpe_dtype):
  dt = DTYPES[dtype]
  tpe = random_counts(rng, cols, tpe_dtype)
  buf = jnp.asarray([rng.uniform(1e-3, 1e-2), rng.uniform(1, 2)], F32)  # d probs stays a normal f16
  g = jnp.float32(rng.uniform(-3, -0.5))
  poison((tokens, cols), dt)
  (dprobs,) = aux_module.aux_loss_bwd_p.bind(buf, tpe, g, tokens=tokens, dtype=dt)
  assert dprobs.shape == (tokens, cols) and dprobs.dtype == dt
  np.testing.assert_array_equal(dprobs, old_dprobs(buf, g, tpe, (tokens, cols), dt))
  want = f64(buf[0]) * f64(g) * np.broadcast_to(f64(tpe), (tokens, cols))
  # Two float32 products, then one rounding to dt.
  assert_close(dprobs, want, float(jnp.finfo(dt).eps) / 2 + 2.0**-23)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_experts,cols", [(64, 64), (64, 128), (37, 37), (13, 130)], ids=str)
def test_gradient_is_bit_identical_to_the_broadcast_formula(rng, num_experts, cols, dtype):
  # Through aux_loss and jax.vjp: C = E or the per-sequence C = B·E, a cotangent other than 1, and f16
  # values down to the subnormals (small coefficient times small counts).
  dt = DTYPES[dtype]
  probs = random_probs(rng, (333, cols), dt)
  tpe = random_counts(rng, cols)
  kw = dict(topk=4 % num_experts or 1, coeff=COEFF, num_experts=num_experts)
  _, vjp = jax.vjp(lambda p: jax_moe.aux_loss(p, tpe, **kw), probs)
  poison(probs.shape, dt)
  (grad,) = vjp(jnp.asarray(-2.5, dt))
  c_coeff = jax_moe.loss_coefficient(num_experts, COEFF, kw["topk"], 333)
  _, buf, _ = aux_module.aux_loss_fwd_p.bind(probs, tpe, coeff=c_coeff)
  np.testing.assert_array_equal(grad, old_dprobs(buf, jnp.float32(-2.5), tpe, probs.shape, dt))
  want = -2.5 * ref.aux_loss_grad(probs.shape, tpe, **kw)
  assert_close(grad, want, GRAD_RTOL[dt], atol=2.0**-25 if dt == F16 else 0.0)  # f16: half a subnormal step


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_kernel_with_no_tokens(rng, dtype):
  tpe = random_counts(rng, 48)
  (dprobs,) = aux_module.aux_loss_bwd_p.bind(jnp.asarray([0.5, 1.0], F32), tpe, jnp.float32(1.5), tokens=0,
                                             dtype=DTYPES[dtype])
  assert dprobs.shape == (0, 48) and dprobs.dtype == DTYPES[dtype]


# ------------------------------------------------------------------------------ aux_loss_scores

def check_scores(logits, topk, score_function, *, rtol):
  scores, counts = jax_moe.aux_loss_scores(logits, topk, score_function=score_function)
  num_experts = logits.shape[-1]
  assert scores.shape == logits.shape and scores.dtype == F32
  assert counts.shape == (num_experts,) and counts.dtype == jnp.int32
  want = ref.clean_scores(logits, score_function)
  got = f64(scores).reshape(want.shape)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * 1e-3 / num_experts, equal_nan=True)
  # The counts are the top-k of the returned float32 scores, exactly.
  np.testing.assert_array_equal(counts, ref.topk_counts(got, topk))
  # And of the float64 scores wherever float32 rounding cannot swap the k-th and the next expert.
  clear = ref.topk_margin(want, topk) > 1e-4
  if clear.any():
    np.testing.assert_array_equal(ref.topk_counts(got[clear], topk), ref.topk_counts(want[clear], topk))
  assert int(counts.sum()) == topk * want.shape[0]
  return scores, counts


def scores_rtol(num_experts):
  return 2e-6 * max(1.0, (num_experts / 64) ** 0.5)


# (E, k, T): k > 32 takes the threshold search instead of k enumeration passes. On the GPU, E <= 256 with
# k <= 32 and E <= 1024 with k <= 8 take the segment kernel (8 lanes a token from 4096 tokens with
# E <= 256, else 32), the rest the row kernel, and E > 1024 a block per row there.
SCORE_CASES = [(32, 1, 333), (32, 4, 1), (32, 32, 65), (256, 8, 333), (256, 33, 65), (1024, 4, 333),
               (1024, 8, 129), (1024, 200, 9), (4096, 8, 33), (4096, 1, 1), (16384, 1, 5), (16384, 8, 17),
               (16384, 40, 3), (130, 8, 4099), (256, 32, 4096), (1024, 32, 7)]


@pytest.mark.parametrize("num_experts,topk,tokens", SCORE_CASES, ids=str)
@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_aux_scores_match_reference(rng, score_function, num_experts, topk, tokens):
  logits = random_logits(rng, (tokens, num_experts))
  check_scores(logits, topk, score_function, rtol=scores_rtol(num_experts))


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_aux_scores_of_half_precision_logits(rng, score_function, dtype):
  # bf16 logits repeat values: many exact ties, decided by index.
  check_scores(random_logits(rng, (2, 99, 256), DTYPES[dtype]), 8, score_function, rtol=scores_rtol(256))


TIE_VALUES = (-1.25, 0.5, 1.0, 2.0)


@pytest.mark.parametrize("topk", [6, 40])
@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_exact_ties_go_to_the_lower_index(rng, score_function, topk):
  logits = jnp.asarray(rng.choice(TIE_VALUES, size=(203, 64)), F32)
  top = np.sort(f64(logits), -1)[:, ::-1]
  assert (top[:, topk - 1] == top[:, topk]).any(), "no tie at the cut"
  check_scores(logits, topk, score_function, rtol=scores_rtol(64))


@pytest.mark.parametrize("num_experts,topk", [(16, 1), (16, 4), (2048, 3), (2048, 40)], ids=str)
@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_nan_and_inf_rows(rng, score_function, num_experts, topk):
  logits = jnp.asarray(non_finite_rows(rng, num_experts), F32)
  check_scores(logits, topk, score_function, rtol=scores_rtol(num_experts))


@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_nan_row_counts_the_first_experts(rng, score_function):
  logits = random_logits(rng, (3, 16)).at[:, 7].set(jnp.nan)
  scores, counts = jax_moe.aux_loss_scores(logits, 3, score_function=score_function)
  assert np.isnan(np.asarray(scores)).all()
  np.testing.assert_array_equal(counts, [3, 3, 3] + [0] * 13)


def test_negative_zero_ties_positive_zero():
  # Scores of 0 from underflow tie, whatever the sign of the logit's exponent term: lower index first.
  logits = jnp.asarray([[-200.0, 0.0, -300.0, 5.0, -250.0]], F32)
  _, counts = jax_moe.aux_loss_scores(logits, 3)
  np.testing.assert_array_equal(counts, [1, 1, 0, 1, 0])


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("num_experts", [48, 2048])
@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_aux_scores_gradient(rng, score_function, num_experts, dtype):
  dt = DTYPES[dtype]
  logits = random_logits(rng, (2, 33, num_experts), dt)
  cot = jnp.asarray(rng.normal(size=logits.shape), F32)
  grad = jax.grad(lambda x: jnp.sum(jax_moe.aux_loss_scores(x, 4, score_function=score_function)[0] * cot))(logits)
  assert grad.shape == logits.shape and grad.dtype == dt
  want = ref.clean_scores_vjp(logits, cot, score_function)
  rtol = 1e-4 if dt == F32 else 1e-2
  assert_grad_close(grad, want, rtol)


# ------------------------------------------------------------------------ aux_loss_from_logits

FROM_LOGITS_CASES = [(32, 4, 333), (256, 8, 4096), (1024, 1, 333), (4096, 8, 33), (16384, 4, 17), (16384, 8, 1)]


@pytest.mark.parametrize("num_experts,topk,tokens", FROM_LOGITS_CASES, ids=str)
@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_from_logits_matches_reference(rng, score_function, num_experts, topk, tokens):
  logits = random_logits(rng, (tokens, num_experts))
  tpe = random_counts(rng, num_experts)
  kw = dict(topk=topk, coeff=COEFF, score_function=score_function)
  loss, grad = jax.value_and_grad(lambda x: jax_moe.aux_loss_from_logits(x, tpe, **kw))(logits)
  assert loss.dtype == F32 and grad.dtype == F32
  assert_close(loss, ref.aux_loss_from_logits(logits, tpe, **kw), 1e-5)
  want = ref.aux_loss_from_logits_grad(logits, tpe, **kw)
  assert_grad_close(grad, want, 1e-4)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_from_logits_half_precision(rng, score_function, dtype):
  logits = random_logits(rng, (4, 50, 128), DTYPES[dtype])
  tpe = random_counts(rng, 128)
  kw = dict(topk=6, coeff=COEFF, score_function=score_function)
  loss, grad = jax.value_and_grad(lambda x: jax_moe.aux_loss_from_logits(x, tpe, **kw))(logits)
  assert loss.dtype == F32 and grad.dtype == logits.dtype
  assert_close(loss, ref.aux_loss_from_logits(logits, tpe, **kw), 1e-5)
  want = ref.aux_loss_from_logits_grad(logits, tpe, **kw)
  assert_grad_close(grad, want, 1e-2)


# 16-bit rows longer than a chunk a lane: the CUDA forward stages the counts in shared memory (up to 16 KB
# of them, 8 KB for softmax), here with rows that are not all 16-byte aligned and end in a partial chunk,
# and counts of either dtype.
@pytest.mark.parametrize("num_experts,dtype,counts_dtype", [(1001, "bf16", "int32"), (2048, "f16", "float32")],
                         ids=str)
@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_from_logits_half_precision_long_rows(rng, score_function, num_experts, dtype, counts_dtype):
  logits = random_logits(rng, (300, num_experts), DTYPES[dtype])
  tpe = random_counts(rng, num_experts, counts_dtype)
  kw = dict(topk=8, coeff=COEFF, score_function=score_function)
  loss = jax_moe.aux_loss_from_logits(logits, tpe, **kw)
  assert_close(loss, ref.aux_loss_from_logits(logits, tpe, **kw), 1e-5)


# Rows too long for registers, with more tokens than the CUDA backward launches blocks (one resident wave,
# about 800-1100 on an H100), so that blocks take several rows: two row copies in shared memory (8 KB
# rows), one (16.4 KB), none (rows not made of 16-byte chunks).
@pytest.mark.parametrize("num_experts,tokens,dtype", [(2048, 2300, "f32"), (4096, 2300, "bf16"),
                                                      (4100, 1700, "f32"), (2049, 1700, "f32")], ids=str)
def test_from_logits_many_long_rows(rng, num_experts, tokens, dtype):
  logits = random_logits(rng, (tokens, num_experts), DTYPES[dtype])
  tpe = random_counts(rng, num_experts)
  kw = dict(topk=8, coeff=COEFF, score_function="softmax")
  grad = jax.grad(lambda x: jax_moe.aux_loss_from_logits(x, tpe, **kw))(logits)
  want = ref.aux_loss_from_logits_grad(logits, tpe, **kw)
  rtol = 1e-4 if dtype == "f32" else 1e-2
  assert_grad_close(grad, want, rtol)


def test_from_logits_rows_of_48_kb(rng):
  # One row copy of exactly 48 KB: with its static shared memory, the CUDA block backward needs more than
  # the 48 KB a launch gets without opting in.
  logits = random_logits(rng, (5, 12288))
  tpe = random_counts(rng, 12288)
  kw = dict(topk=8, coeff=COEFF, score_function="sigmoid")
  grad = jax.grad(lambda x: jax_moe.aux_loss_from_logits(x, tpe, **kw))(logits)
  want = ref.aux_loss_from_logits_grad(logits, tpe, **kw)
  assert_grad_close(grad, want, 1e-4)


@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_from_logits_equals_the_composition(rng, score_function):
  logits = random_logits(rng, (257, 96))
  tpe = random_counts(rng, 96)
  fused = jax.value_and_grad(
      lambda x: jax_moe.aux_loss_from_logits(x, tpe, topk=4, coeff=COEFF, score_function=score_function))
  composed = jax.value_and_grad(lambda x: jax_moe.aux_loss(
      jax_moe.aux_loss_scores(x, 4, score_function=score_function)[0], tpe, topk=4, coeff=COEFF))
  (l1, g1), (l2, g2) = fused(logits), composed(logits)
  assert_close(l1, f64(l2), 1e-5)
  np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-4 * float(jnp.abs(g2).max()))


@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_from_logits_non_finite_rows_follow_the_formulas(rng, score_function):
  logits = jnp.asarray(non_finite_rows(rng, 16), F32)
  tpe = random_counts(rng, 16)
  loss = jax_moe.aux_loss_from_logits(logits, tpe, topk=2, coeff=COEFF, score_function=score_function)
  want = ref.aux_loss_from_logits(logits, tpe, topk=2, coeff=COEFF, score_function=score_function)
  assert np.isnan(want) and np.isnan(float(loss))
  finite = logits[-1:]
  loss = jax_moe.aux_loss_from_logits(finite.at[0, 3].set(-jnp.inf), tpe, topk=2, coeff=COEFF,
                                      score_function=score_function)
  assert_close(loss, ref.aux_loss_from_logits(finite.at[0, 3].set(-jnp.inf), tpe, topk=2, coeff=COEFF,
                                              score_function=score_function), 1e-5)


# --------------------------------------------------------------------------- tokens_per_expert

def test_tokens_per_expert_counts_in_range_indices(rng):
  indices = jnp.asarray(rng.integers(-3, 70, size=(333, 8)), jnp.int32)
  counts = jax_moe.tokens_per_expert(indices, 64)
  flat = np.asarray(indices).reshape(-1)
  want = np.bincount(flat[(flat >= 0) & (flat < 64)], minlength=64)
  assert counts.dtype == jnp.int32 and counts.shape == (64,)
  np.testing.assert_array_equal(counts, want)
  np.testing.assert_array_equal(jax.jit(jax_moe.tokens_per_expert, static_argnums=1)(indices, 64), want)
  np.testing.assert_array_equal(jax_moe.tokens_per_expert(indices.astype(jnp.uint8), 64), np.bincount(
      np.asarray(indices.astype(jnp.uint8)).reshape(-1), minlength=256)[:64])


def test_tokens_per_expert_of_route_matches_aux_scores(rng):
  logits = random_logits(rng, (333, 64))
  route = jax_moe.route(logits, 6, score_function="softmax", use_pre_softmax=True)
  _, counts = jax_moe.aux_loss_scores(logits, 6)
  np.testing.assert_array_equal(jax_moe.tokens_per_expert(route.indices, 64), counts)


# ------------------------------------------------------------------------------- determinism

def test_repeated_calls_are_bit_identical(rng):
  probs = random_probs(rng, (4096, 256))
  logits = random_logits(rng, (4096, 256))
  tpe = random_counts(rng, 256)
  loss = jax.jit(jax.value_and_grad(lambda p: jax_moe.aux_loss(p, tpe, topk=8, coeff=COEFF)))
  fused = jax.jit(jax.value_and_grad(
      lambda x: jax_moe.aux_loss_from_logits(x, tpe, topk=8, coeff=COEFF, score_function="sigmoid")))
  scores = jax.jit(functools.partial(jax_moe.aux_loss_scores, topk=8))
  for fn, arg in ((loss, probs), (fused, logits), (scores, logits)):
    first = jax.tree.map(np.asarray, fn(arg))
    for _ in range(3):
      jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, fn(arg)), first)
  # Eager and jitted run the same kernels.
  np.testing.assert_array_equal(jax_moe.aux_loss(probs, tpe, topk=8, coeff=COEFF), loss(probs)[0])


def test_outputs_are_fully_written(rng):
  # Poison: free buffers full of garbage of the outputs' sizes first, so a kernel that leaves an
  # element unwritten (or counts without zeroing) returns garbage that the exact checks below catch.
  logits = random_logits(rng, (99, 130))
  tpe = random_counts(rng, 130)
  for _ in range(3):
    poison = [jnp.full(logits.shape, jnp.nan, F32), jnp.full((130,), 12345, jnp.int32), jnp.full((2,), jnp.nan)]
    jax.block_until_ready(poison)
    del poison
    scores, counts = jax_moe.aux_loss_scores(logits, 5, score_function="sqrtsoftplus")
    assert np.isfinite(np.asarray(scores)).all()
    np.testing.assert_array_equal(counts, ref.topk_counts(f64(scores), 5))
    grad = jax.grad(lambda x: jax_moe.aux_loss_from_logits(x, tpe, topk=5, coeff=COEFF))(logits)
    assert np.isfinite(np.asarray(grad)).all() and np.asarray(grad).all()
    loss = jax_moe.aux_loss(random_probs(rng, (3, 130)), tpe, topk=5, coeff=COEFF)
    assert np.isfinite(float(loss)) and float(loss) > 0


# ---------------------------------------------------------------------------- transformations

def test_jit_matches_eager(rng):
  logits = random_logits(rng, (45, 256), BF16)
  tpe = random_counts(rng, 256)
  fn = functools.partial(jax_moe.aux_loss_from_logits, topk=8, coeff=COEFF)
  np.testing.assert_array_equal(jax.jit(fn)(logits, tpe), fn(logits, tpe))
  s1, c1 = jax.jit(functools.partial(jax_moe.aux_loss_scores, topk=8))(logits)
  s2, c2 = jax_moe.aux_loss_scores(logits, 8)
  np.testing.assert_array_equal(s1, s2)
  np.testing.assert_array_equal(c1, c2)


@pytest.mark.parametrize("in_axis", [0, 1])
@pytest.mark.parametrize("batched_tpe", [False, True])
def test_vmap_aux_loss_is_a_batch_of_losses(rng, in_axis, batched_tpe):
  probs = random_probs(rng, (3, 40, 64))
  tpe = jnp.stack([random_counts(rng, 64) for _ in range(3)]) if batched_tpe else random_counts(rng, 64)
  fn = functools.partial(jax_moe.aux_loss, topk=4, coeff=COEFF)
  got = jax.vmap(fn, in_axes=(in_axis, 0 if batched_tpe else None))(jnp.moveaxis(probs, 0, in_axis), tpe)
  each = [fn(probs[b], tpe[b] if batched_tpe else tpe) for b in range(3)]
  np.testing.assert_array_equal(got, jnp.stack(each))
  assert_close(got[1], ref.aux_loss(probs[1], tpe[1] if batched_tpe else tpe, topk=4, coeff=COEFF), 1e-5)


def test_vmap_aux_loss_scores_counts_per_batch_element(rng):
  logits = random_logits(rng, (3, 17, 64))
  scores, counts = jax.vmap(lambda x: jax_moe.aux_loss_scores(x, 4, score_function="sigmoid"), in_axes=1,
                            out_axes=(1, 0))(jnp.moveaxis(logits, 0, 1))
  assert counts.shape == (3, 64)
  for b in range(3):
    s, c = jax_moe.aux_loss_scores(logits[b], 4, score_function="sigmoid")
    np.testing.assert_array_equal(scores[:, b], s)
    np.testing.assert_array_equal(counts[b], c)


@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_vmap_of_grad(rng, score_function):
  logits = random_logits(rng, (3, 17, 64))
  probs = random_probs(rng, (3, 17, 64))
  tpe = random_counts(rng, 64)
  fused = jax.value_and_grad(
      lambda x: jax_moe.aux_loss_from_logits(x, tpe, topk=4, coeff=COEFF, score_function=score_function))
  plain = jax.value_and_grad(lambda p: jax_moe.aux_loss(p, tpe, topk=4, coeff=COEFF))
  scores = jax.grad(lambda x: jnp.sum(jax_moe.aux_loss_scores(x, 4, score_function=score_function)[0] ** 2))
  for fn, x in ((fused, logits), (plain, probs), (scores, logits)):
    batched = jax.vmap(fn)(x)
    each = jax.tree.map(lambda *v: jnp.stack(v), *[fn(x[b]) for b in range(3)])
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-12), batched, each)


@pytest.mark.parametrize("batched_tpe", [False, True])
def test_vmap_of_grad_is_a_batch_of_gradients(rng, batched_tpe):
  probs = random_probs(rng, (3, 40, 130), BF16)
  tpe = jnp.stack([random_counts(rng, 130) for _ in range(3)]) if batched_tpe else random_counts(rng, 130)
  grad = jax.grad(lambda p, c: jax_moe.aux_loss(p, c, topk=4, coeff=COEFF).astype(F32))
  got = jax.jit(jax.vmap(grad, in_axes=(1, 0 if batched_tpe else None)))(jnp.moveaxis(probs, 0, 1), tpe)
  assert got.shape == probs.shape and got.dtype == BF16
  for b in range(3):
    np.testing.assert_array_equal(got[b], grad(probs[b], tpe[b] if batched_tpe else tpe))


def test_vmap_of_backward_kernel_over_the_cotangent(rng):
  tpe = random_counts(rng, 64)
  gs = jnp.asarray(rng.uniform(0.5, 2, size=3), F32)
  bwd = functools.partial(aux_module.aux_loss_bwd_p.bind, jnp.asarray([0.25, 1.0], F32), tpe, tokens=17,
                          dtype=F16)
  batched = jax.vmap(lambda g: bwd(g)[0])(gs)
  for b in range(3):
    np.testing.assert_array_equal(batched[b], bwd(gs[b])[0])


def test_vmap_of_logits_backward_with_shared_buffer(rng):
  # The backward kernel folds a batch of logits into tokens when tpe, buffer and cotangent are shared.
  logits = random_logits(rng, (3, 17, 64))
  tpe = random_counts(rng, 64).astype(F32)
  buf, g = jnp.asarray([0.25, 0.0], F32), jnp.float32(1.5)
  bwd = functools.partial(aux_module.aux_logits_bwd_p.bind, score_function=1)
  batched = jax.vmap(lambda x: bwd(x, tpe, buf, g)[0])(logits)
  for b in range(3):
    np.testing.assert_array_equal(batched[b], bwd(logits[b], tpe, buf, g)[0])


def test_grad_of_jit(rng):
  logits = random_logits(rng, (31, 256))
  tpe = random_counts(rng, 256)
  kw = dict(topk=8, coeff=COEFF, score_function="sqrtsoftplus")
  grad = jax.jit(jax.grad(lambda x: jax_moe.aux_loss_from_logits(x, tpe, **kw)))(logits)
  want = ref.aux_loss_from_logits_grad(logits, tpe, **kw)
  assert_grad_close(grad, want, 1e-4)


# ------------------------------------------------------------------------------------ sharding

def _global_inputs(rng, tokens=4 * 333, num_experts=256):
  return random_probs(rng, (tokens, num_experts)), random_logits(rng, (tokens, num_experts)), \
      random_counts(rng, num_experts)


@pytest.mark.parametrize("mesh_shape,axis_name", [((4,), "x"), ((2, 2), ("x", "y"))], ids=["1d", "2d"])
def test_shard_map_with_axis_name_gives_the_global_loss(rng, mesh_shape, axis_name):
  names = ("x",) if len(mesh_shape) == 1 else ("x", "y")
  mesh = four_device_mesh(mesh_shape, names)
  probs, logits, tpe = _global_inputs(rng)
  tokens = P(axis_name, None)

  def sharded(fn):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(tokens, P()), out_specs=P()))

  def sharded_grad(fn):
    return jax.jit(jax.shard_map(jax.value_and_grad(fn), mesh=mesh, in_specs=(tokens, P()),
                                 out_specs=(P(), tokens)))

  loss = lambda p, c: jax_moe.aux_loss(p, c, topk=8, coeff=COEFF, axis_name=axis_name)
  fused = lambda x, c: jax_moe.aux_loss_from_logits(x, c, topk=8, coeff=COEFF, axis_name=axis_name,
                                                    score_function="sigmoid")
  want_loss = jax_moe.aux_loss(probs, tpe, topk=8, coeff=COEFF)
  want_fused = jax_moe.aux_loss_from_logits(logits, tpe, topk=8, coeff=COEFF, score_function="sigmoid")
  assert_close(sharded(loss)(probs, tpe), f64(want_loss), 1e-6)
  assert_close(sharded(fused)(logits, tpe), f64(want_fused), 1e-6)
  # The gradient of the global loss: the same coefficient on every shard.
  _, grad = sharded_grad(loss)(probs, tpe)
  np.testing.assert_array_equal(grad, jax.grad(lambda p: jax_moe.aux_loss(p, tpe, topk=8, coeff=COEFF))(probs))
  _, grad = sharded_grad(fused)(logits, tpe)
  want = jax.grad(lambda x: jax_moe.aux_loss_from_logits(x, tpe, topk=8, coeff=COEFF,
                                                         score_function="sigmoid"))(logits)
  np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-12)


def test_shard_map_counts(rng):
  mesh = four_device_mesh()
  logits = random_logits(rng, (4 * 33, 64))
  route = jax_moe.route(logits, 4, score_function="sigmoid")

  def counts(x, idx):
    local = jax_moe.aux_loss_scores(x, 4)[1]
    return jax.lax.psum(local, "x"), jax_moe.tokens_per_expert(idx, 64, axis_name="x")

  fn = jax.jit(jax.shard_map(counts, mesh=mesh, in_specs=(P("x", None), P("x", None)), out_specs=(P(), P())))
  got_scores, got_route = fn(logits, route.indices)
  np.testing.assert_array_equal(got_scores, jax_moe.aux_loss_scores(logits, 4)[1])
  np.testing.assert_array_equal(got_route, jax_moe.tokens_per_expert(route.indices, 64))


def test_shard_map_without_axis_name_is_local(rng):
  # Without axis_name, T and the sums are the shard's own: the per-shard losses of the shards' rows.
  mesh = four_device_mesh()
  probs, _, tpe = _global_inputs(rng)
  fn = jax.jit(jax.shard_map(lambda p, c: jax_moe.aux_loss(p, c, topk=8, coeff=COEFF)[None], mesh=mesh,
                             in_specs=(P("x", None), P()), out_specs=P("x")))
  got = fn(probs, tpe)
  for s in range(4):
    assert_close(got[s], ref.aux_loss(probs[s * 333:(s + 1) * 333], tpe, topk=8, coeff=COEFF), 1e-5)


def _token_sharded(mesh, *arrays):
  return [jax.device_put(a, NamedSharding(mesh, P("x", None))) for a in arrays]


def test_jit_with_token_sharded_probs_needs_no_all_gather(rng):
  mesh = four_device_mesh()
  probs, logits, tpe = _global_inputs(rng)
  s_probs, s_logits = _token_sharded(mesh, probs, logits)
  loss = jax.jit(jax.value_and_grad(lambda p, c: jax_moe.aux_loss(p, c, topk=8, coeff=COEFF)))
  fused = jax.jit(jax.value_and_grad(lambda x, c: jax_moe.aux_loss_from_logits(x, c, topk=8, coeff=COEFF)))
  for fn, sharded, whole in ((loss, s_probs, probs), (fused, s_logits, logits)):
    (l1, g1), (l2, g2) = fn(sharded, tpe), fn(whole, tpe)
    assert_close(l1, f64(l2), 1e-6)  # global T and global sums, added in another order
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-12)
    hlo = fn.lower(sharded, tpe).compile().as_text()
    assert "all-gather" not in hlo
    assert "all-reduce" in hlo  # the partial sums are added, not the inputs gathered


def backward_shapes(hlo):
  """The result shapes of the compiled module's d probs kernels."""
  calls = [line for line in hlo.splitlines() if 'custom_call_target="jax_moe_aux_loss_bwd"' in line]
  return [re.search(r"= (\w+\[[\d,]*\])", line).group(1) for line in calls]


@pytest.mark.parametrize("mesh_shape,axis_name", [((4,), "x"), ((2, 2), ("x", "y"))], ids=["1d", "2d"])
def test_jit_gradient_is_written_per_token_shard(rng, mesh_shape, axis_name):
  # No operand of the d probs kernel has tokens: it writes the rows its users shard, here the jit's
  # out_shardings (probs' own) and the softmax backward of token-sharded logits. Each device writes its
  # [T/4, C] rows; nothing is gathered.
  mesh = four_device_mesh(mesh_shape, ("x",) if len(mesh_shape) == 1 else ("x", "y"))
  tokens = NamedSharding(mesh, P(axis_name, None))
  probs, logits, tpe = _global_inputs(rng)
  probs = probs.astype(BF16)
  loss = lambda p, c: jax_moe.aux_loss(p, c, topk=8, coeff=COEFF).astype(F32)
  through_softmax = lambda x, c: loss(jax.nn.softmax(x).astype(BF16), c)
  cases = ((jax.grad(loss), dict(out_shardings=tokens), probs, 0.0),
           (jax.grad(through_softmax), {}, logits, 1e-5))  # the softmax backward's sums may differ
  for grad_fn, jit_kw, x, rtol in cases:
    fn = jax.jit(grad_fn, **jit_kw)
    x_sharded = jax.device_put(x, tokens)
    grad = fn(x_sharded, tpe)
    assert grad.sharding.is_equivalent_to(tokens, grad.ndim)
    want = f64(grad_fn(x, tpe))
    assert (np.abs(f64(grad) - want) <= grad_atol(want, rtol)).all()
    hlo = fn.lower(x_sharded, tpe).compile().as_text()
    assert "all-gather" not in hlo
    assert backward_shapes(hlo) == [f"bf16[{x.shape[0] // 4},256]"]


def test_jit_with_token_sharded_logits_gives_global_counts(rng):
  mesh = four_device_mesh()
  _, logits, _ = _global_inputs(rng)
  (s_logits,) = _token_sharded(mesh, logits)
  fn = jax.jit(functools.partial(jax_moe.aux_loss_scores, topk=8, score_function="sqrtsoftplus"))
  (s1, c1), (s2, c2) = fn(s_logits), fn(logits)
  np.testing.assert_array_equal(c1, c2)
  np.testing.assert_array_equal(s1, s2)
  assert "all-gather" not in fn.lower(s_logits).compile().as_text()
  cot = jnp.asarray(rng.normal(size=logits.shape), F32)
  grad = jax.jit(jax.grad(lambda x, c: jnp.sum(fn(x)[0] * c)))
  np.testing.assert_array_equal(grad(s_logits, *_token_sharded(mesh, cot)), grad(logits, cot))
  assert "all-gather" not in grad.lower(s_logits, *_token_sharded(mesh, cot)).compile().as_text()


# ------------------------------------------------------------------------- compiled graph (HLO)

@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_probs_and_logits_reach_the_kernel_without_convert(rng, dtype):
  probs = random_probs(rng, (64, 256), DTYPES[dtype])
  logits = random_logits(rng, (64, 256), DTYPES[dtype])
  tpe = random_counts(rng, 256).astype(F32)
  loss = jax.jit(functools.partial(jax_moe.aux_loss, topk=8, coeff=COEFF))
  fused = jax.jit(functools.partial(jax_moe.aux_loss_from_logits, topk=8, coeff=COEFF))
  scores = jax.jit(functools.partial(jax_moe.aux_loss_scores, topk=8))
  assert_inputs_reach_kernel_unconverted(loss.lower(probs, tpe).compile().as_text(), parameters=(0,))
  assert_inputs_reach_kernel_unconverted(fused.lower(logits, tpe).compile().as_text(), parameters=(0,))
  assert_inputs_reach_kernel_unconverted(scores.lower(logits).compile().as_text(), parameters=(0,))


# ------------------------------------------------------------------------------------- bad input

def _p(rows=4, cols=64, dtype=F32):
  return jnp.full((rows, cols), 1.0 / cols, dtype)


def _c(n=64):
  return jnp.arange(1, n + 1, dtype=jnp.int32)


BAD_CALLS = {  # name: (thunk, the argument the message must name)
    "probs_rank1": (lambda: jax_moe.aux_loss(jnp.ones(64), _c(), topk=2, coeff=0.1), "probs"),
    "probs_rank3": (lambda: jax_moe.aux_loss(jnp.ones((2, 3, 64)), _c(), topk=2, coeff=0.1), "probs"),
    "probs_int": (lambda: jax_moe.aux_loss(jnp.ones((3, 64), jnp.int32), _c(), topk=2, coeff=0.1), "probs"),
    "probs_f64_like_int": (lambda: jax_moe.aux_loss(np.ones((3, 64), np.int64), _c(), topk=2, coeff=0.1), "probs"),
    "cols_not_multiple": (lambda: jax_moe.aux_loss(_p(), _c(), topk=2, coeff=0.1, num_experts=48),
                          "num_experts"),
    "num_experts_zero": (lambda: jax_moe.aux_loss(_p(), _c(), topk=2, coeff=0.1, num_experts=0), "num_experts"),
    "num_experts_float": (lambda: jax_moe.aux_loss(_p(), _c(), topk=2, coeff=0.1, num_experts=32.0),
                          "num_experts"),
    "tpe_wrong_length": (lambda: jax_moe.aux_loss(_p(), _c(63), topk=2, coeff=0.1), "tokens_per_expert"),
    "tpe_2d": (lambda: jax_moe.aux_loss(_p(), _c().reshape(1, 64), topk=2, coeff=0.1), "tokens_per_expert"),
    "tpe_bool": (lambda: jax_moe.aux_loss(_p(), jnp.ones(64, bool), topk=2, coeff=0.1), "tokens_per_expert"),
    "tpe_per_sequence_needs_c": (lambda: jax_moe.aux_loss(_p(cols=128), _c(64), topk=2, coeff=0.1, num_experts=64),
                                 "tokens_per_expert"),
    "topk_zero": (lambda: jax_moe.aux_loss(_p(), _c(), topk=0, coeff=0.1), "topk"),
    "topk_above_experts": (lambda: jax_moe.aux_loss(_p(cols=128), _c(128), topk=65, coeff=0.1, num_experts=64),
                           "topk"),
    "topk_float": (lambda: jax_moe.aux_loss(_p(), _c(), topk=2.0, coeff=0.1), "topk"),
    "coeff_array": (lambda: jax_moe.aux_loss(_p(), _c(), topk=2, coeff=jnp.float32(0.1)), "coeff"),
    "coeff_traced": (lambda: jax.jit(lambda p, c: jax_moe.aux_loss(p, _c(), topk=2, coeff=c))(_p(), 0.1), "coeff"),
    "topk_traced": (lambda: jax.jit(lambda p, k: jax_moe.aux_loss(p, _c(), topk=k, coeff=0.1))(_p(), 2), "topk"),
    "total_traced": (lambda: jax.jit(lambda p, t: jax_moe.aux_loss(p, _c(), topk=2, coeff=0.1,
                                                                   total_num_tokens=t))(_p(), 8),
                     "total_num_tokens"),
    "total_negative": (lambda: jax_moe.aux_loss(_p(), _c(), topk=2, coeff=0.1, total_num_tokens=-1),
                       "total_num_tokens"),
    "axis_name_int": (lambda: jax_moe.aux_loss(_p(), _c(), topk=2, coeff=0.1, axis_name=3), "axis_name"),
    "axis_name_unbound": (lambda: jax_moe.aux_loss(_p(), _c(), topk=2, coeff=0.1, axis_name="nope"), "axis_name"),
    "logits_scalar": (lambda: jax_moe.aux_loss_from_logits(jnp.float32(1), _c(1), topk=1, coeff=0.1), "logits"),
    "logits_int": (lambda: jax_moe.aux_loss_from_logits(jnp.ones((3, 64), jnp.int32), _c(), topk=2, coeff=0.1),
                   "logits"),
    "logits_tpe_length": (lambda: jax_moe.aux_loss_from_logits(_p(), _c(32), topk=2, coeff=0.1),
                          "tokens_per_expert"),
    "logits_topk": (lambda: jax_moe.aux_loss_from_logits(_p(), _c(), topk=65, coeff=0.1), "topk"),
    "logits_score_function": (lambda: jax_moe.aux_loss_from_logits(_p(), _c(), topk=2, coeff=0.1,
                                                                   score_function="relu"), "score_function"),
    "logits_coeff": (lambda: jax_moe.aux_loss_from_logits(_p(), _c(), topk=2, coeff="0.1"), "coeff"),
    "scores_topk_above": (lambda: jax_moe.aux_loss_scores(_p(), 65), "topk"),
    "scores_topk_negative": (lambda: jax_moe.aux_loss_scores(_p(), -1), "topk"),
    "scores_topk_traced": (lambda: jax.jit(lambda x, k: jax_moe.aux_loss_scores(x, k))(_p(), 2), "topk"),
    "scores_score_function": (lambda: jax_moe.aux_loss_scores(_p(), 2, score_function="Softmax"),
                              "score_function"),
    "scores_logits_int": (lambda: jax_moe.aux_loss_scores(jnp.ones((2, 8), jnp.int32), 2), "logits"),
    "scores_logits_scalar": (lambda: jax_moe.aux_loss_scores(jnp.float32(0.5), 1), "logits"),
    "tpe_indices_float": (lambda: jax_moe.tokens_per_expert(jnp.ones((3, 2)), 8), "indices"),
    "tpe_num_experts_zero": (lambda: jax_moe.tokens_per_expert(jnp.ones((3, 2), jnp.int32), 0), "num_experts"),
    "tpe_num_experts_traced": (lambda: jax.jit(lambda i, n: jax_moe.tokens_per_expert(i, n))(
        jnp.ones((3, 2), jnp.int32), 8), "num_experts"),
    "tpe_axis_unbound": (lambda: jax_moe.tokens_per_expert(jnp.ones((3, 2), jnp.int32), 8, axis_name="x"),
                         "axis_name"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_raises_naming_the_argument(case):
  call, argument = BAD_CALLS[case]
  with pytest.raises((ValueError, TypeError), match=re.escape(argument)):
    call()


def _buf(dtype=F32):
  return jnp.asarray([0.5, 1.0], dtype)


def _g(dtype=F32):
  return jnp.asarray(1.5, dtype)


_DPROBS = dict(tokens=4, dtype=F32)

INCONSISTENT_BUFFERS = {  # name: (kernel, operands, static parameters, what the error names)
    "loss_fwd_short_tpe": ("aux_loss_fwd_p", lambda: (_p(), jnp.ones(63, F32)), dict(coeff=0.5), "tokens_per_expert"),
    "logits_bwd_short_buffer": ("aux_logits_bwd_p", lambda: (_p(), jnp.ones(64, F32), jnp.ones(1, F32), _g()),
                                dict(score_function=0), "buffer"),
    "loss_bwd_short_buffer": ("aux_loss_bwd_p", lambda: (jnp.ones(1, F32), _c(), _g()), _DPROBS, "buffer"),
    "loss_bwd_f16_buffer": ("aux_loss_bwd_p", lambda: (_buf(F16), _c(), _g()), _DPROBS, "buffer"),
    "loss_bwd_2d_tpe": ("aux_loss_bwd_p", lambda: (_buf(), _c().reshape(8, 8), _g()), _DPROBS, "tokens_per_expert"),
    "loss_bwd_int16_tpe": ("aux_loss_bwd_p", lambda: (_buf(), _c().astype(jnp.int16), _g()), _DPROBS,
                           "tokens_per_expert"),
    "loss_bwd_vector_cotangent": ("aux_loss_bwd_p", lambda: (_buf(), _c(), jnp.ones(3, F32)), _DPROBS, "cotangent"),
    "loss_bwd_bf16_cotangent": ("aux_loss_bwd_p", lambda: (_buf(), _c(), _g(BF16)), _DPROBS, "cotangent"),
    "loss_bwd_int_dprobs": ("aux_loss_bwd_p", lambda: (_buf(), _c(), _g()), dict(tokens=4, dtype=jnp.int32),
                            "d probs"),
}


@pytest.mark.parametrize("case", INCONSISTENT_BUFFERS)
def test_kernels_reject_inconsistent_buffers(case):
  # Bypassing the Python checks, the FFI handler itself refuses buffers that do not match.
  kernel, args, params, message = INCONSISTENT_BUFFERS[case]
  with pytest.raises(Exception, match=message):
    jax.block_until_ready(getattr(aux_module, kernel).bind(*args(), **params))
