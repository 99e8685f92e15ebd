"""Tests of jax_moe.permute, unpermute and grouped_matmul (SPEC §3, §4) against float64 NumPy references.

Inputs are rounded to the dtype under test first; the references then compute in float64 from those exact
values. Permutation outputs (rows, group sizes, sort_map) are compared exactly; sums are compared within a
tolerance of the output dtype's rounding (float32 accumulation in the kernels).
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

import jax_moe
from jax_moe import experts

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
DTYPES = {"f32": F32, "bf16": BF16, "f16": F16}
# Relative error of one rounding to the dtype, with room for float32 accumulation.
RTOL = {"f32": 2e-6, "bf16": 8e-3, "f16": 1e-3}


# ------------------------------------------------------------------------------------ references

def np_permute(x, indices, num_experts):
  """x [T, H] float64, indices [T, k] -> (x_sorted, group_sizes, sort_map), by an explicit stable sort."""
  tokens, topk = indices.shape
  flat = indices.reshape(-1).astype(np.int64)
  valid = (flat >= 0) & (flat < num_experts)
  key = np.where(valid, flat, num_experts)
  sort_map = np.array(sorted(range(flat.size), key=lambda p: (key[p], p)), np.int64).reshape(-1)
  rows = np.zeros((flat.size, x.shape[1]))
  for r, p in enumerate(sort_map):
    if valid[p]:
      rows[r] = x[p // topk]
  sizes = np.array([(flat == e).sum() for e in range(num_experts)], np.int64)
  return rows, sizes, sort_map


def np_inverse(sort_map, pairs):
  """pos[p] = the largest r with sort_map[r] == p, or -1 (the documented rule for non-permutations)."""
  pos = np.full(pairs, -1, np.int64)
  for r, p in enumerate(sort_map):
    if 0 <= p < pairs:
      pos[p] = max(pos[p], r)
  return pos


def np_permute_grad(dx_sorted, indices, num_experts, sort_map):
  tokens, topk = indices.shape
  flat = indices.reshape(-1)
  pos = np_inverse(sort_map, flat.size)
  dx = np.zeros((tokens, dx_sorted.shape[1]))
  for p in range(flat.size):
    if 0 <= flat[p] < num_experts:
      dx[p // topk] += dx_sorted[pos[p]]
  return dx


def np_unpermute(y_sorted, sort_map, weights):
  tokens, topk = weights.shape
  pos = np_inverse(sort_map, tokens * topk)
  y = np.zeros((tokens, y_sorted.shape[1]))
  for p in range(tokens * topk):
    if pos[p] >= 0:
      y[p // topk] += weights.reshape(-1)[p] * y_sorted[pos[p]]
  return y


def np_unpermute_grad(dy, y_sorted, sort_map, weights):
  """(d y_sorted, d weights) of y = unpermute(y_sorted, sort_map, weights) for cotangent dy."""
  tokens, topk = weights.shape
  pos = np_inverse(sort_map, tokens * topk)
  dys = np.zeros_like(y_sorted)
  dw = np.zeros(tokens * topk)
  for p in range(tokens * topk):
    if pos[p] >= 0:
      dys[pos[p]] = weights.reshape(-1)[p] * dy[p // topk]
      dw[p] = dy[p // topk] @ y_sorted[pos[p]]
  return dys, dw.reshape(tokens, topk)


def np_group_rows(group_sizes, m):
  """[(start, end)] per group: negative sizes count as 0, the running sum is clamped at M."""
  ends = np.minimum(np.cumsum(np.maximum(np.asarray(group_sizes, np.int64), 0)), m)
  starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
  return list(zip(starts, ends))


def np_gmm(lhs, rhs, group_sizes):
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  for g, (s, e) in enumerate(np_group_rows(group_sizes, lhs.shape[0])):
    out[s:e] = lhs[s:e] @ rhs[g]
  return out


def np_gmm_grad(lhs, rhs, group_sizes, dout):
  dlhs, drhs = np.zeros_like(lhs), np.zeros_like(rhs)
  for g, (s, e) in enumerate(np_group_rows(group_sizes, lhs.shape[0])):
    dlhs[s:e] = dout[s:e] @ rhs[g].T
    drhs[g] = lhs[s:e].T @ dout[s:e]
  return dlhs, drhs


# ---------------------------------------------------------------------------------------- helpers

def rounded(rng, shape, dtype, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale, dtype)


def f64(a):
  return np.asarray(jnp.asarray(a, F32), np.float64)


def assert_close(got, want, dtype_name, scale=None):
  """|got - want| <= rtol * (|want| + scale): rounding relative to each value, with a floor for sums
  whose terms cancel (scale: typical magnitude of the terms)."""
  got = f64(got)
  assert got.shape == want.shape, (got.shape, want.shape)
  scale = np.abs(want).max(initial=0.0) if scale is None else scale
  np.testing.assert_allclose(got, want, rtol=RTOL[dtype_name], atol=RTOL[dtype_name] * scale + 1e-30)


def random_indices(rng, tokens, topk, num_experts, invalid=0.2):
  """Distinct-or-not experts per token with a share of invalid entries (-1, E, large values)."""
  idx = rng.integers(0, num_experts, size=(tokens, topk))
  bad = rng.random((tokens, topk)) < invalid
  junk = rng.choice([-1, num_experts, num_experts + 7, -1000], size=(tokens, topk))
  return jnp.asarray(np.where(bad, junk, idx), jnp.int32)


# ----------------------------------------------------------------------------------------- permute

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden,topk,num_experts", [(37, 13, 3, 7), (64, 24, 8, 16), (5, 1, 2, 300)])
def test_permute_matches_reference(rng, dtype, tokens, hidden, topk, num_experts):
  x = rounded(rng, (tokens, hidden), DTYPES[dtype])
  idx = random_indices(rng, tokens, topk, num_experts)
  x_sorted, sizes, sort_map = jax_moe.permute(x, idx, num_experts)
  want_rows, want_sizes, want_map = np_permute(f64(x), np.asarray(idx), num_experts)
  assert x_sorted.dtype == x.dtype and x_sorted.shape == (tokens * topk, hidden)
  assert sizes.dtype == jnp.int32 and sort_map.dtype == jnp.int32
  np.testing.assert_array_equal(sort_map, want_map)
  np.testing.assert_array_equal(sizes, want_sizes)
  np.testing.assert_array_equal(f64(x_sorted), want_rows)  # a copy: exact, zeros for invalid pairs


def test_permute_order_is_stable_with_ties(rng):
  # Many pairs per expert: rows are ordered by (expert, t, j), invalid pairs last in (t, j) order.
  tokens, topk, num_experts = 300, 4, 3  # 1200 pairs: many sort chunks
  idx = jnp.asarray(rng.choice([0, 0, 0, 1, 2, -1, 3], size=(tokens, topk)), jnp.int32)
  x = jnp.asarray(np.arange(tokens, dtype=np.float32)[:, None] * np.ones((1, 8), np.float32))
  x_sorted, sizes, sort_map = jax_moe.permute(x, idx, num_experts)
  flat = np.asarray(idx).reshape(-1)
  key = np.where((flat >= 0) & (flat < num_experts), flat, num_experts)
  sm = np.asarray(sort_map)
  assert sorted(sm.tolist()) == list(range(tokens * topk))
  order = list(zip(key[sm], sm))
  assert order == sorted(order), "rows are not ordered by (expert, pair)"
  np.testing.assert_array_equal(sizes, np.bincount(key, minlength=num_experts + 1)[:num_experts])
  valid = key[sm] < num_experts
  np.testing.assert_array_equal(np.asarray(x_sorted)[:, 0], np.where(valid, sm // topk, 0))


def test_permute_all_pairs_to_one_expert_and_all_invalid(rng):
  x = rounded(rng, (33, 16), BF16)
  for fill, want in ((5, [0] * 5 + [66] + [0] * 2), (-1, [0] * 8), (8, [0] * 8)):
    idx = jnp.full((33, 2), fill, jnp.int32)
    x_sorted, sizes, sort_map = jax_moe.permute(x, idx, 8)
    np.testing.assert_array_equal(sizes, want)
    np.testing.assert_array_equal(sort_map, np.arange(66))
    expect = np.repeat(f64(x), 2, axis=0) if fill == 5 else np.zeros((66, 16))
    np.testing.assert_array_equal(f64(x_sorted), expect)


def test_permute_many_experts_and_pairs(rng):
  # E = 8192 (SPEC §4) and a chunk x bucket table above the cap, so a larger chunk is chosen.
  tokens, topk, num_experts = 700, 8, 8192
  assert experts._sort_chunk(tokens * topk, num_experts) == experts._SORT_CHUNK
  assert experts._sort_chunk(200_000, 8192) > experts._SORT_CHUNK
  x = rounded(rng, (tokens, 8), F32)
  idx = random_indices(rng, tokens, topk, num_experts, invalid=0.05)
  x_sorted, sizes, sort_map = jax_moe.permute(x, idx, num_experts)
  want_rows, want_sizes, want_map = np_permute(f64(x), np.asarray(idx), num_experts)
  np.testing.assert_array_equal(sort_map, want_map)
  np.testing.assert_array_equal(sizes, want_sizes)
  np.testing.assert_array_equal(f64(x_sorted), want_rows)


@pytest.mark.parametrize("pairs,num_experts", [(0, 1), (1, 1), (32768, 256), (10**6, 8192), (2**31 - 1, 4)])
def test_sort_chunk_keeps_the_count_table_small(pairs, num_experts):
  chunk = experts._sort_chunk(pairs, num_experts)
  assert chunk >= 32 and chunk % 32 == 0
  chunks = -(-pairs // chunk)
  assert chunks * (num_experts + 1) <= max(experts._SORT_MAX_COUNTS, num_experts + 1)


def test_permute_no_tokens():
  x_sorted, sizes, sort_map = jax_moe.permute(jnp.zeros((0, 16), BF16), jnp.zeros((0, 4), jnp.int32), 8)
  assert x_sorted.shape == (0, 16) and x_sorted.dtype == BF16 and sort_map.shape == (0,)
  np.testing.assert_array_equal(sizes, np.zeros(8))
  grad = jax.grad(lambda x: jax_moe.permute(x, jnp.zeros((0, 4), jnp.int32), 8)[0].sum())(jnp.zeros((0, 16)))
  assert grad.shape == (0, 16)


def test_permute_leading_dims_are_tokens(rng):
  x = rounded(rng, (2, 5, 12), F32)
  idx = random_indices(rng, 10, 3, 4).reshape(2, 5, 3)
  got = jax_moe.permute(x, idx, 4)
  want = jax_moe.permute(x.reshape(10, 12), idx.reshape(10, 3), 4)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("index_dtype", [jnp.int8, jnp.uint8, jnp.int16, jnp.uint32])
def test_permute_other_integer_indices(rng, index_dtype):
  x = rounded(rng, (20, 4), F32)
  raw = rng.integers(0, 6, size=(20, 2))  # 5 is out of range for E = 5
  got = jax_moe.permute(x, jnp.asarray(raw, index_dtype), 5)
  want = jax_moe.permute(x, jnp.asarray(raw, jnp.int32), 5)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_gradient(rng, dtype):
  tokens, hidden, topk, num_experts = 23, 10, 3, 5
  x = rounded(rng, (tokens, hidden), DTYPES[dtype])
  idx = random_indices(rng, tokens, topk, num_experts)
  cot = rounded(rng, (tokens * topk, hidden), DTYPES[dtype])
  grad = jax.grad(lambda a: jnp.sum(jax_moe.permute(a, idx, num_experts)[0].astype(F32) * cot.astype(F32)))(x)
  assert grad.dtype == x.dtype
  sort_map = np.asarray(jax_moe.permute(x, idx, num_experts)[2])
  want = np_permute_grad(f64(cot), np.asarray(idx), num_experts, sort_map)
  assert_close(grad, want, dtype, scale=np.abs(f64(cot)).max())


def test_permute_check_grads(rng):
  x = rounded(rng, (9, 6), F32)
  idx = random_indices(rng, 9, 2, 4)
  check_grads(lambda a: jax_moe.permute(a, idx, 4)[0], (x,), order=1, modes=("rev",))


def test_permute_integer_outputs_take_float0_cotangents(rng):
  x = rounded(rng, (6, 4), F32)
  idx = random_indices(rng, 6, 2, 3)
  out, vjp = jax.vjp(lambda a: jax_moe.permute(a, idx, 3), x)
  cot = jnp.ones_like(out[0])
  (dx,) = vjp((cot, np.zeros(out[1].shape, jax.dtypes.float0), np.zeros(out[2].shape, jax.dtypes.float0)))
  want = np_permute_grad(np.ones((12, 4)), np.asarray(idx), 3, np.asarray(out[2]))
  np.testing.assert_array_equal(dx, want)


def test_permute_jit_and_vmap(rng):
  batch, tokens, hidden, topk, num_experts = 3, 11, 8, 2, 4
  xs = rounded(rng, (batch, tokens, hidden), BF16)
  idxs = jnp.stack([random_indices(rng, tokens, topk, num_experts) for _ in range(batch)])
  fn = functools.partial(jax_moe.permute, num_experts=num_experts)
  each = [fn(x, i) for x, i in zip(xs, idxs)]
  for got in (jax.jit(jax.vmap(fn))(xs, idxs), jax.vmap(fn, in_axes=(1, 1))(jnp.swapaxes(xs, 0, 1),
                                                                            jnp.swapaxes(idxs, 0, 1))):
    for out, want in zip(got, zip(*each)):
      np.testing.assert_array_equal(out, jnp.stack(want))
  # Shared x, batched indices.
  got = jax.vmap(fn, in_axes=(None, 0))(xs[0], idxs)
  for b in range(batch):
    for out, want in zip(got, fn(xs[0], idxs[b])):
      np.testing.assert_array_equal(out[b], want)


def test_permute_nested_vmap_and_vmap_of_grad(rng):
  xs = rounded(rng, (2, 3, 7, 5), F32)
  idxs = jnp.asarray(rng.integers(-1, 5, size=(2, 3, 7, 2)), jnp.int32)
  fn = functools.partial(jax_moe.permute, num_experts=4)
  got = jax.vmap(jax.vmap(fn))(xs, idxs)
  for a in range(2):
    for b in range(3):
      for out, want in zip(got, fn(xs[a, b], idxs[a, b])):
        np.testing.assert_array_equal(out[a, b], want)
  cots = rounded(rng, (2, 14, 5), F32)

  def grad(x, i, c):
    return jax.grad(lambda a: jnp.sum(fn(a, i)[0] * c))(x)
  batched = jax.vmap(grad)(xs[:, 0], idxs[:, 0], cots)
  for a in range(2):
    np.testing.assert_allclose(batched[a], grad(xs[a, 0], idxs[a, 0], cots[a]), rtol=1e-6)


# --------------------------------------------------------------------------------------- unpermute

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights_dtype", ["f32", "bf16"])
def test_unpermute_matches_reference(rng, dtype, weights_dtype):
  tokens, hidden, topk, num_experts = 29, 19, 4, 6
  idx = random_indices(rng, tokens, topk, num_experts)
  _, _, sort_map = jax_moe.permute(jnp.zeros((tokens, 1)), idx, num_experts)
  y_sorted = rounded(rng, (tokens * topk, hidden), DTYPES[dtype])
  weights = jnp.asarray(rng.random((tokens, topk)), DTYPES[weights_dtype])
  y = jax_moe.unpermute(y_sorted, sort_map, weights)
  assert y.dtype == y_sorted.dtype and y.shape == (tokens, hidden)
  want = np_unpermute(f64(y_sorted), np.asarray(sort_map), f64(weights))
  assert_close(y, want, dtype, scale=np.abs(f64(y_sorted)).max())


# topk = 40: more pairs a token than a warp has lanes.
@pytest.mark.parametrize("tokens,hidden,topk,num_experts", [(17, 12, 3, 5), (5, 24, 40, 48)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpermute_gradient(rng, dtype, tokens, hidden, topk, num_experts):
  idx = random_indices(rng, tokens, topk, num_experts)
  _, _, sort_map = jax_moe.permute(jnp.zeros((tokens, 1)), idx, num_experts)
  y_sorted = rounded(rng, (tokens * topk, hidden), DTYPES[dtype])
  weights = jnp.asarray(rng.random((tokens, topk)), F32)
  cot = rounded(rng, (tokens, hidden), DTYPES[dtype])

  def loss(ys, w):
    return jnp.sum(jax_moe.unpermute(ys, sort_map, w).astype(F32) * cot.astype(F32))
  dys, dw = jax.grad(loss, argnums=(0, 1))(y_sorted, weights)
  assert dys.dtype == y_sorted.dtype and dw.dtype == F32
  want_dys, want_dw = np_unpermute_grad(f64(cot), f64(y_sorted), np.asarray(sort_map), f64(weights))
  assert_close(dys, want_dys, dtype, scale=np.abs(f64(cot)).max())
  # d weights is a float32 dot product of H terms: float32 rounding, whatever the row dtype.
  np.testing.assert_allclose(f64(dw), want_dw, rtol=1e-5, atol=1e-5 * np.sqrt(hidden))


def test_unpermute_check_grads(rng):
  idx = random_indices(rng, 7, 2, 3)
  _, _, sort_map = jax_moe.permute(jnp.zeros((7, 1)), idx, 3)
  y_sorted = rounded(rng, (14, 5), F32)
  weights = jnp.asarray(rng.random((7, 2)), F32)
  check_grads(lambda ys, w: jax_moe.unpermute(ys, sort_map, w), (y_sorted, weights), order=1, modes=("rev",))


def test_unpermute_inverts_permute(rng):
  tokens, hidden, topk, num_experts = 41, 16, 4, 8
  x = rounded(rng, (tokens, hidden), F32)
  idx = random_indices(rng, tokens, topk, num_experts)
  weights = jnp.asarray(rng.random((tokens, topk)), F32)
  x_sorted, _, sort_map = jax_moe.permute(x, idx, num_experts)
  y = jax_moe.unpermute(x_sorted, sort_map, weights)
  valid = (np.asarray(idx) >= 0) & (np.asarray(idx) < num_experts)
  want = (f64(weights) * valid).sum(-1, keepdims=True) * f64(x)
  np.testing.assert_allclose(f64(y), want, rtol=1e-6, atol=1e-6)


def test_unpermute_with_a_sort_map_that_is_not_a_permutation(rng):
  # Documented: the last row holding a pair is used; rows holding no pair get zero gradient.
  tokens, topk, hidden = 5, 2, 3
  sort_map = jnp.asarray([3, 3, 0, 9, -4, 1, 2, 3, 5, 6], jnp.int32)
  y_sorted = rounded(rng, (10, hidden), F32)
  weights = jnp.asarray(rng.random((tokens, topk)), F32)
  cot = rounded(rng, (tokens, hidden), F32)
  y, vjp = jax.vjp(lambda ys, w: jax_moe.unpermute(ys, sort_map, w), y_sorted, weights)
  np.testing.assert_allclose(f64(y), np_unpermute(f64(y_sorted), np.asarray(sort_map), f64(weights)),
                             rtol=1e-6, atol=1e-6)
  dys, dw = vjp(cot)
  want_dys, want_dw = np_unpermute_grad(f64(cot), f64(y_sorted), np.asarray(sort_map), f64(weights))
  np.testing.assert_allclose(f64(dys), want_dys, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(f64(dw), want_dw, rtol=1e-5, atol=1e-5)


def test_unpermute_no_tokens_and_leading_dims(rng):
  y = jax_moe.unpermute(jnp.zeros((0, 6), F16), jnp.zeros((0,), jnp.int32), jnp.zeros((0, 3)))
  assert y.shape == (0, 6) and y.dtype == F16
  idx = random_indices(rng, 6, 2, 3)
  _, _, sort_map = jax_moe.permute(jnp.zeros((6, 1)), idx, 3)
  y_sorted = rounded(rng, (12, 4), F32)
  weights = jnp.asarray(rng.random((2, 3, 2)), F32)
  got = jax_moe.unpermute(y_sorted, sort_map, weights)
  assert got.shape == (2, 3, 4)
  np.testing.assert_array_equal(got.reshape(6, 4), jax_moe.unpermute(y_sorted, sort_map, weights.reshape(6, 2)))


def test_unpermute_jit_vmap_and_vmap_of_grad(rng):
  batch, tokens, hidden, topk, num_experts = 3, 9, 8, 2, 4
  maps = jnp.stack([jax_moe.permute(jnp.zeros((tokens, 1)), random_indices(rng, tokens, topk, num_experts),
                                    num_experts)[2] for _ in range(batch)])
  ys = rounded(rng, (batch, tokens * topk, hidden), BF16)
  ws = jnp.asarray(rng.random((batch, tokens, topk)), F32)
  each = jnp.stack([jax_moe.unpermute(*a) for a in zip(ys, maps, ws)])
  np.testing.assert_array_equal(jax.jit(jax.vmap(jax_moe.unpermute))(ys, maps, ws), each)
  shared = jax.vmap(jax_moe.unpermute, in_axes=(0, None, 0))(ys, maps[0], ws)
  np.testing.assert_array_equal(shared[1], jax_moe.unpermute(ys[1], maps[0], ws[1]))
  cots = rounded(rng, (batch, tokens, hidden), BF16)

  def grad(y, m, w, c):
    return jax.grad(lambda a, b: jnp.sum(jax_moe.unpermute(a, m, b).astype(F32) * c), argnums=(0, 1))(y, w)
  batched = jax.jit(jax.vmap(grad))(ys, maps, ws, cots)
  for b in range(batch):
    for got, want in zip(batched, grad(ys[b], maps[b], ws[b], cots[b])):
      np.testing.assert_allclose(f64(got[b]), f64(want), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------- grouped_matmul

GMM_CASES = {  # name: (M, K, N, group_sizes)
    "balanced": (24, 16, 8, [6, 6, 6, 6]),
    "odd_shapes": (37, 13, 11, [5, 0, 17, 9, 6]),
    "empty_groups": (20, 8, 12, [0, 7, 0, 0, 13, 0]),
    "all_rows_in_one_group": (19, 9, 7, [0, 0, 19, 0]),
    "sum_below_m": (30, 8, 8, [4, 0, 9, 5]),            # rows 18.. are zero
    "sum_above_m": (16, 8, 8, [5, 9, 7, 3]),            # clamped: group 2 gets 2 rows, group 3 none
    "negative_sizes": (21, 6, 5, [4, -3, 8, -100, 9]),  # negatives count as 0
    "one_row": (1, 5, 3, [0, 1]),
    "no_rows": (0, 8, 4, [0, 0, 0]),
}


def gmm_inputs(rng, case, dtype):
  m, k, n, sizes = GMM_CASES[case]
  lhs = rounded(rng, (m, k), dtype)
  rhs = rounded(rng, (len(sizes), k, n), dtype, scale=k**-0.5)
  return lhs, rhs, jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GMM_CASES)
def test_grouped_matmul_matches_reference(rng, case, dtype):
  lhs, rhs, sizes = gmm_inputs(rng, case, DTYPES[dtype])
  out = jax_moe.grouped_matmul(lhs, rhs, sizes)
  assert out.dtype == lhs.dtype and out.shape == (lhs.shape[0], rhs.shape[2])
  want = np_gmm(f64(lhs), f64(rhs), np.asarray(sizes))
  assert_close(out, want, dtype, scale=np.abs(want).max(initial=0.0))
  # Rows no group covers must be exactly zero (not left over from other memory).
  covered = np_group_rows(np.asarray(sizes), lhs.shape[0])[-1][1]
  assert not np.asarray(f64(out)[covered:]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["odd_shapes", "empty_groups", "sum_below_m", "sum_above_m", "negative_sizes",
                                  "no_rows"])
def test_grouped_matmul_gradients(rng, case, dtype):
  lhs, rhs, sizes = gmm_inputs(rng, case, DTYPES[dtype])
  cot = rounded(rng, (lhs.shape[0], rhs.shape[2]), DTYPES[dtype])
  dlhs, drhs = jax.grad(lambda a, b: jnp.sum(jax_moe.grouped_matmul(a, b, sizes).astype(F32) * cot.astype(F32)),
                        argnums=(0, 1))(lhs, rhs)
  assert dlhs.dtype == lhs.dtype and drhs.dtype == rhs.dtype
  want_dlhs, want_drhs = np_gmm_grad(f64(lhs), f64(rhs), np.asarray(sizes), f64(cot))
  assert_close(dlhs, want_dlhs, dtype, scale=np.abs(want_dlhs).max(initial=0.0))
  assert_close(drhs, want_drhs, dtype, scale=np.abs(want_drhs).max(initial=0.0))
  rows = np_group_rows(np.asarray(sizes), lhs.shape[0])
  assert not f64(dlhs)[rows[-1][1]:].any(), "d lhs must be zero past the last group"
  for g, (s, e) in enumerate(rows):
    if s == e:
      assert not f64(drhs[g]).any(), f"d rhs of empty group {g} must be zero"


def test_grouped_matmul_check_grads(rng):
  lhs, rhs, sizes = gmm_inputs(rng, "odd_shapes", F32)
  check_grads(lambda a, b: jax_moe.grouped_matmul(a, b, sizes), (lhs, rhs), order=1, modes=("rev",))


def test_grouped_matmul_agrees_with_ragged_dot(rng):
  lhs, rhs, sizes = gmm_inputs(rng, "odd_shapes", F32)
  want = jax.lax.ragged_dot(lhs, rhs, sizes, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(jax_moe.grouped_matmul(lhs, rhs, sizes), want, rtol=1e-5, atol=1e-5)


def test_grouped_matmul_other_integer_group_sizes(rng):
  lhs, rhs, _ = gmm_inputs(rng, "odd_shapes", F32)
  for sizes in (jnp.asarray([5, 0, 17, 9, 6], jnp.int16), jnp.asarray([5, 0, 17, 9, 200], jnp.uint8)):
    want = np_gmm(f64(lhs), f64(rhs), np.asarray(sizes))
    np.testing.assert_allclose(f64(jax_moe.grouped_matmul(lhs, rhs, sizes)), want, rtol=2e-6, atol=2e-6)


def test_grouped_matmul_jit_vmap_and_vmap_of_grad(rng):
  batch = 3
  lhs = rounded(rng, (batch, 20, 8), F32)
  rhs = rounded(rng, (batch, 4, 8, 6), F32)
  sizes = jnp.asarray(rng.integers(-1, 8, size=(batch, 4)), jnp.int32)
  gmm = jax_moe.grouped_matmul
  all_batched = jax.jit(jax.vmap(gmm))(lhs, rhs, sizes)
  shared_rhs = jax.vmap(gmm, in_axes=(0, None, 0))(lhs, rhs[0], sizes)
  shared_sizes = jax.vmap(gmm, in_axes=(1, 0, None))(jnp.swapaxes(lhs, 0, 1), rhs, sizes[0])
  for b in range(batch):
    np.testing.assert_allclose(all_batched[b], gmm(lhs[b], rhs[b], sizes[b]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(shared_rhs[b], gmm(lhs[b], rhs[0], sizes[b]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(shared_sizes[b], gmm(lhs[b], rhs[b], sizes[0]), rtol=1e-6, atol=1e-6)
  cots = rounded(rng, (batch, 20, 6), F32)

  def grad(a, b, s, c):
    return jax.grad(lambda x, w: jnp.sum(gmm(x, w, s) * c), argnums=(0, 1))(a, b)
  batched = jax.jit(jax.vmap(grad, in_axes=(0, None, 0, 0)))(lhs, rhs[0], sizes, cots)
  for b in range(batch):
    want_dlhs, want_drhs = np_gmm_grad(f64(lhs[b]), f64(rhs[0]), np.asarray(sizes[b]), f64(cots[b]))
    np.testing.assert_allclose(f64(batched[0][b]), want_dlhs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(batched[1][b]), want_drhs, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- sharding

def four_device_mesh():
  if len(jax.devices()) < 4:
    pytest.skip(f"needs 4 devices, {jax.devices()[0].platform} has {len(jax.devices())}")
  return Mesh(np.array(jax.devices()[:4]), ("x",))


def test_shard_map_runs_each_shard_on_its_own_tokens(rng):
  # Expert parallelism: every shard sorts its tokens and multiplies by its own experts.
  mesh = four_device_mesh()
  tokens, hidden, ffn, topk, num_experts = 9, 8, 6, 2, 3
  x = rounded(rng, (4 * tokens, hidden), BF16)
  idx = jnp.asarray(rng.integers(-1, num_experts + 1, size=(4 * tokens, topk)), jnp.int32)
  weights = jnp.asarray(rng.random((4 * tokens, topk)), F32)
  w_experts = rounded(rng, (4 * num_experts, hidden, ffn), BF16)

  def layer(x, idx, weights, w_experts):
    x_sorted, sizes, sort_map = jax_moe.permute(x, idx, num_experts)
    return jax_moe.unpermute(jax_moe.grouped_matmul(x_sorted, w_experts, sizes), sort_map, weights), sizes

  sharded = jax.jit(jax.shard_map(layer, mesh=mesh, in_specs=(P("x"),) * 4, out_specs=(P("x"), P("x"))))
  y, sizes = sharded(x, idx, weights, w_experts)
  for d in range(4):
    rows, groups = slice(d * tokens, (d + 1) * tokens), slice(d * num_experts, (d + 1) * num_experts)
    want_y, want_sizes = layer(x[rows], idx[rows], weights[rows], w_experts[groups])
    np.testing.assert_array_equal(y[rows], want_y)
    np.testing.assert_array_equal(sizes[groups], want_sizes)


def test_jit_with_sharded_inputs_sorts_globally(rng):
  mesh = four_device_mesh()
  x = rounded(rng, (4 * 7, 8), F32)
  idx = random_indices(rng, 4 * 7, 2, 5)
  weights = jnp.asarray(rng.random((4 * 7, 2)), F32)
  tokens = NamedSharding(mesh, P("x"))
  fn = jax.jit(lambda x, i, w: jax_moe.unpermute(*jax_moe.permute(x, i, 5)[::2], w))
  want = fn(x, idx, weights)
  got = fn(jax.device_put(x, tokens), jax.device_put(idx, tokens), jax.device_put(weights, tokens))
  np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------ the three together

@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_moe_layer_end_to_end(rng, dtype):
  """permute -> grouped_matmul -> unpermute equals the dense per-pair formula, gradients included."""
  tokens, hidden, ffn, topk, num_experts = 26, 16, 12, 3, 5
  dt = DTYPES[dtype]
  x = rounded(rng, (tokens, hidden), dt)
  w_experts = rounded(rng, (num_experts, hidden, ffn), dt, scale=hidden**-0.5)
  idx = random_indices(rng, tokens, topk, num_experts)
  weights = jnp.asarray(rng.random((tokens, topk)), F32)
  cot = rounded(rng, (tokens, ffn), F32)

  def layer(x, w_experts, weights):
    x_sorted, sizes, sort_map = jax_moe.permute(x, idx, num_experts)
    return jax_moe.unpermute(jax_moe.grouped_matmul(x_sorted, w_experts, sizes), sort_map, weights)

  y, vjp = jax.vjp(jax.jit(layer), x, w_experts, weights)
  dx, dwe, dw = vjp(cot.astype(dt))
  xn, wn, gn, cn = f64(x), f64(w_experts), f64(weights), f64(cot.astype(dt))
  want_y = np.zeros((tokens, ffn))
  want_dx, want_dwe, want_dw = np.zeros_like(xn), np.zeros_like(wn), np.zeros_like(gn)
  for t in range(tokens):
    for j in range(topk):
      e = int(idx[t, j])
      if 0 <= e < num_experts:
        h = xn[t] @ wn[e]
        want_y[t] += gn[t, j] * h
        want_dx[t] += gn[t, j] * (wn[e] @ cn[t])
        want_dwe[e] += gn[t, j] * np.outer(xn[t], cn[t])
        want_dw[t, j] = h @ cn[t]
  # bf16 rounds the expert outputs and gradients on the way (once per op): a looser bound.
  tol = {"f32": 1e-5, "bf16": 3e-2}[dtype]
  for got, want in ((y, want_y), (dx, want_dx), (dwe, want_dwe), (dw, want_dw)):
    np.testing.assert_allclose(f64(got), want, rtol=tol, atol=tol * np.abs(want).max())


# ------------------------------------------------------------------------------------- bad input

def _x(shape=(4, 8), dtype=F32):
  return jnp.zeros(shape, dtype)


def _idx(shape=(4, 2)):
  return jnp.zeros(shape, jnp.int32)


BAD_CALLS = {  # name: (thunk, the argument the message must name)
    "permute_int_x": (lambda: jax_moe.permute(_idx(), _idx(), 4), "x"),
    "permute_scalar_x": (lambda: jax_moe.permute(jnp.float32(1), _idx(), 4), "x"),
    "permute_float_indices": (lambda: jax_moe.permute(_x(), _x((4, 2)), 4), "indices"),
    "permute_indices_tokens_differ": (lambda: jax_moe.permute(_x(), _idx((5, 2)), 4), "indices"),
    "permute_indices_rank_differs": (lambda: jax_moe.permute(_x(), _idx((4, 2, 1)), 4), "indices"),
    "permute_no_slots": (lambda: jax_moe.permute(_x(), _idx((4, 0)), 4), "indices"),
    "permute_zero_experts": (lambda: jax_moe.permute(_x(), _idx(), 0), "num_experts"),
    "permute_float_experts": (lambda: jax_moe.permute(_x(), _idx(), 4.0), "num_experts"),
    "permute_traced_experts": (lambda: jax.jit(lambda e: jax_moe.permute(_x(), _idx(), e))(4), "num_experts"),
    "unpermute_int_rows": (lambda: jax_moe.unpermute(_idx((8, 3)), _idx((8,)), _x((4, 2))), "y_sorted"),
    "unpermute_rows_rank": (lambda: jax_moe.unpermute(_x((8, 3, 1)), _idx((8,)), _x((4, 2))), "y_sorted"),
    "unpermute_rows_count": (lambda: jax_moe.unpermute(_x((9, 3)), _idx((9,)), _x((4, 2))), "y_sorted"),
    "unpermute_float_sort_map": (lambda: jax_moe.unpermute(_x((8, 3)), _x((8,)), _x((4, 2))), "sort_map"),
    "unpermute_sort_map_shape": (lambda: jax_moe.unpermute(_x((8, 3)), _idx((7,)), _x((4, 2))), "sort_map"),
    "unpermute_int_weights": (lambda: jax_moe.unpermute(_x((8, 3)), _idx((8,)), _idx((4, 2))), "weights"),
    "unpermute_scalar_weights": (lambda: jax_moe.unpermute(_x((8, 3)), _idx((8,)), jnp.float32(1)), "weights"),
    "gmm_lhs_rank": (lambda: jax_moe.grouped_matmul(_x((2, 4, 8)), _x((2, 8, 3)), _idx((2,))), "lhs"),
    "gmm_int_lhs": (lambda: jax_moe.grouped_matmul(_idx((4, 8)), _x((2, 8, 3)), _idx((2,))), "lhs"),
    "gmm_rhs_rank": (lambda: jax_moe.grouped_matmul(_x((4, 8)), _x((8, 3)), _idx((2,))), "rhs"),
    "gmm_rhs_contraction": (lambda: jax_moe.grouped_matmul(_x((4, 8)), _x((2, 7, 3)), _idx((2,))), "rhs"),
    "gmm_rhs_dtype": (lambda: jax_moe.grouped_matmul(_x((4, 8)), _x((2, 8, 3), BF16), _idx((2,))), "rhs"),
    "gmm_group_sizes_length": (lambda: jax_moe.grouped_matmul(_x((4, 8)), _x((2, 8, 3)), _idx((3,))),
                               "group_sizes"),
    "gmm_group_sizes_rank": (lambda: jax_moe.grouped_matmul(_x((4, 8)), _x((2, 8, 3)), _idx((2, 1))),
                             "group_sizes"),
    "gmm_float_group_sizes": (lambda: jax_moe.grouped_matmul(_x((4, 8)), _x((2, 8, 3)), _x((2,))),
                              "group_sizes"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input_raises_naming_the_argument(case):
  call, argument = BAD_CALLS[case]
  with pytest.raises((ValueError, TypeError), match=re.escape(argument)):
    call()


def _ffi_call(target, results, *args, **attrs):
  return jax.ffi.ffi_call(target, results)(*args, **attrs)


@pytest.mark.parametrize("case", ["permute_chunk", "permute_workspace", "permute_rows", "unpermute_weights",
                                  "gmm_out", "gmm_dtype"])
def test_kernels_reject_inconsistent_buffers(case):
  # Called with buffers that disagree, the kernels return an FFI error instead of touching memory.
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
  f32 = lambda *s: jax.ShapeDtypeStruct(s, F32)  # noqa: E731
  x, idx = jnp.ones((1, 4, 8)), jnp.zeros((1, 4, 2), jnp.int32)
  permute_results = [f32(1, 8, 8), i32(1, 3), i32(1, 8), i32(1, 8), i32(4 * 2)]
  calls = {
      "permute_chunk": lambda: _ffi_call("jax_moe_permute_fwd", permute_results, x, idx,
                                         num_experts=np.int64(3), chunk=np.int64(48)),
      "permute_workspace": lambda: _ffi_call("jax_moe_permute_fwd", permute_results[:4] + [i32(3)], x, idx,
                                             num_experts=np.int64(3), chunk=np.int64(256)),
      "permute_rows": lambda: _ffi_call("jax_moe_permute_fwd", [f32(1, 9, 8)] + permute_results[1:], x, idx,
                                        num_experts=np.int64(3), chunk=np.int64(256)),
      "unpermute_weights": lambda: _ffi_call("jax_moe_unpermute_fwd", [f32(1, 4, 8), i32(1, 8)],
                                             jnp.ones((1, 8, 8)), jnp.zeros((1, 8), jnp.int32),
                                             jnp.ones((1, 4, 3))),
      "gmm_out": lambda: _ffi_call("jax_moe_gmm_fwd", [f32(5, 3), jax.ShapeDtypeStruct((0,), jnp.uint8)],
                                   jnp.ones((4, 8)), jnp.ones((2, 8, 3)), jnp.zeros((2,), jnp.int32)),
      "gmm_dtype": lambda: _ffi_call("jax_moe_gmm_fwd", [f32(4, 3), jax.ShapeDtypeStruct((0,), jnp.uint8)],
                                     jnp.ones((4, 8)), jnp.ones((2, 8, 3), BF16), jnp.zeros((2,), jnp.int32)),
  }
  with pytest.raises(Exception, match="jax_moe"):
    jax.block_until_ready(calls[case]())
