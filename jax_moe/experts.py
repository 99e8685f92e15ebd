"""Running the experts (SPEC §3): token permutation by expert, the grouped matmul, and the weighted
combination back into token order.

    x_sorted, group_sizes, sort_map = permute(x, indices, num_experts)
    h = grouped_matmul(x_sorted, w_experts, group_sizes)      # rows past Σ group_sizes are zero
    y = unpermute(h, sort_map, weights)

Reads top to bottom: the public functions, their custom_vjps, then the primitives.

The permute/unpermute primitives carry a leading batch dimension (the public functions use 1; vmap
stacks its batch there, so a vmapped call is still one kernel call) and hidden outputs: permute's
`pos` (the row of each pair, negative for invalid pairs: its backward gathers with it) and its
counting-sort workspace; unpermute's `pos` (the inverse of sort_map, computed on the device, used by
its backward). The grouped matmul primitives return a uint8 workspace sized at trace time by the CUDA
extension (0 bytes on a CPU-only build); the public function drops it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from . import _checks as checks
from . import _ffi
from ._ffi import batch_size, derived_aval, kernel_primitive, match_manual_axes, move_batch_to_front

_GEMM_DTYPES = {jnp.dtype(jnp.float32): 0, jnp.dtype(jnp.bfloat16): 1, jnp.dtype(jnp.float16): 2}  # GemmDtype
_GEMM_FWD, _GEMM_DLHS, _GEMM_DRHS = 0, 1, 2  # GemmOp in src/grouped_gemm.h
_INT32_MAX = 2**31 - 1
_SORT_CHUNK = 64            # pairs per counting-sort chunk (one warp walks a chunk); a multiple of 32
_SORT_MAX_COUNTS = 1 << 20  # cap on the per-batch chunk x bucket count table (4 MiB of int32)


def permute(x, indices, num_experts: int):
    """Sorts the (token, slot) pairs by expert, stably, and gathers the token rows (SPEC §3).

    Args:
      x: [..., H] float32, bfloat16 or float16 tokens; all leading dims are tokens (T of them).
      indices: [..., k] integer expert of each (token, slot) pair, with the leading dims of x
        (typically Routing.indices). Values outside [0, num_experts) are allowed: such a pair
        belongs to no expert.
      num_experts: E, a static int >= 1.

    Returns:
      (x_sorted [T·k, H] in x's dtype, group_sizes int32 [E], sort_map int32 [T·k]). Rows are
      ordered by (expert, t, j): pair (t, j) lands in the rows of expert indices[t, j], tokens in
      order within an expert. sort_map[r] = t·k + j of the pair in row r. Pairs whose index is
      outside [0, E) come after every group, in (t, j) order; they count in no group size and their
      rows of x_sorted are zero, so after grouped_matmul (which leaves rows past Σ group_sizes zero)
      they add nothing in unpermute.

    Differentiable in x: d x[t] = Σ_j d x_sorted[row of (t, j)] over the valid pairs (float32 sum,
    in x's dtype). indices get no gradient.

    Decisions where the SPEC is silent:
      * indices of a wider integer type are mapped to int32 first (values outside the int32 range
        stay out of range, never wrap into [0, E)).
      * under vmap each batch element is sorted on its own (one kernel call for the whole batch).
      * the sort is global over the tokens: under jit with sharded inputs they are gathered first;
        inside shard_map each shard sorts its own tokens.
    """
    x = checks.float_array(x, "x")
    if x.ndim < 1:
        raise ValueError("x must have shape [..., H], got a scalar")
    indices = _check_int(indices, "indices")
    if indices.ndim != x.ndim or indices.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"indices must have shape [..., k] with the leading dims of x {x.shape[:-1]}, "
                         f"got {indices.shape}")
    topk = indices.shape[-1]
    if topk < 1:
        raise ValueError("indices must have at least one slot per token (k >= 1)")
    num_experts = checks.static_int(num_experts, "num_experts")
    if not 1 <= num_experts < _INT32_MAX:
        raise ValueError(f"num_experts must be in [1, 2^31 - 1), got {num_experts}")
    tokens, hidden = math.prod(x.shape[:-1]), x.shape[-1]
    if tokens * topk > _INT32_MAX:
        raise ValueError(f"T·k = {tokens}·{topk} must fit in int32")
    x, indices = match_manual_axes(x, _to_int32(indices, num_experts))
    x_sorted, group_sizes, sort_map = _permute(x.reshape(1, tokens, hidden), indices.reshape(1, tokens, topk),
                                               num_experts, topk)
    return x_sorted[0], group_sizes[0], sort_map[0]


def unpermute(y_sorted, sort_map, weights):
    """Weighted sum of each token's rows: y[t] = Σ_j weights[t, j] · y_sorted[pos(t, j)] (SPEC §3).

    Args:
      y_sorted: [T·k, H] float32, bfloat16 or float16 rows in permute's order.
      sort_map: [T·k] integer, as returned by permute: sort_map[r] = t·k + j of the pair in row r;
        pos is its inverse (computed on the device).
      weights: [..., k] float32, bfloat16 or float16 (typically Routing.weights); its leading dims
        are the tokens (T of them) and the leading dims of the result.

    Returns:
      y [..., H] in y_sorted's dtype, accumulated in float32 in slot order.

    Differentiable in y_sorted (d y_sorted[r] = weights[t, j] · d y[t] for the pair (t, j) of row
    r) and in weights (d weights[t, j] = <d y[t], y_sorted[pos(t, j)]>, float32, in weights'
    dtype). sort_map gets no gradient.

    Decisions where the SPEC is silent:
      * a sort_map that is not a permutation of [0, T·k) is not rejected (that would need a host
        sync): a pair held by no row contributes nothing, a pair held by several rows uses the last
        of them, and rows that hold no pair (or out-of-range entries) get a zero gradient.
      * under vmap each batch element is combined on its own (one kernel call for the whole batch).
    """
    y_sorted = checks.float_array(y_sorted, "y_sorted")
    weights = checks.float_array(weights, "weights")
    sort_map = _check_int(sort_map, "sort_map")
    if y_sorted.ndim != 2:
        raise ValueError(f"y_sorted must have shape [T·k, H], got {y_sorted.shape}")
    if weights.ndim < 1 or weights.shape[-1] < 1:
        raise ValueError(f"weights must have shape [..., k] with k >= 1, got {weights.shape}")
    tokens, topk = math.prod(weights.shape[:-1]), weights.shape[-1]
    pairs, hidden = y_sorted.shape
    if pairs != tokens * topk:
        raise ValueError(f"y_sorted must have T·k = {tokens}·{topk} = {tokens * topk} rows "
                         f"(weights {weights.shape}), got {pairs}")
    if sort_map.shape != (pairs,):
        raise ValueError(f"sort_map must have shape ({pairs},) like the rows of y_sorted, got {sort_map.shape}")
    if pairs > _INT32_MAX:
        raise ValueError(f"T·k = {pairs} must fit in int32")
    y_sorted, sort_map, weights = match_manual_axes(y_sorted, _to_int32(sort_map, pairs), weights)
    y = _unpermute(y_sorted[None], sort_map[None], weights.reshape(1, tokens, topk))
    return y.reshape(*weights.shape[:-1], hidden)


def grouped_matmul(lhs, rhs, group_sizes):
    """Grouped (ragged) matmul with jax.lax.ragged_dot semantics (SPEC §3).

    Args:
      lhs: [M, K] float32, bfloat16 or float16; rows are grouped contiguously, in group order.
      rhs: [G, K, N], the dtype of lhs.
      group_sizes: [G] integer, on the device (never read by the host: no synchronisation, so a
        jitted step stays capturable as a CUDA graph). Negative sizes count as 0; a running sum
        above M is clamped at M.

    Returns:
      [M, N] in lhs' dtype, accumulated in float32: rows of group g are lhs rows times rhs[g]; rows
      past Σ group_sizes are zero.

    Differentiable in lhs (d lhs = grouped_matmul(d out, rhsᵀ), zero past Σ group_sizes) and rhs
    (d rhs[g] = lhs_gᵀ · d out_g, zeros for empty groups); group_sizes gets no gradient.

    Decisions where the SPEC is silent:
      * rhs must have lhs' dtype (TypeError otherwise: no silent conversion of the weights).
      * group_sizes of a wider integer type are clipped to [0, M] before the int32 conversion (the
        same result, without wrapping).
      * under vmap the kernel runs once per batch element (lax.map); unbatched operands are shared,
        never broadcast.
    """
    lhs = checks.float_array(lhs, "lhs")
    rhs = checks.float_array(rhs, "rhs")
    group_sizes = _check_int(group_sizes, "group_sizes")
    if lhs.ndim != 2:
        raise ValueError(f"lhs must have shape [M, K], got {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs must have shape [G, K, N], got {rhs.shape}")
    if rhs.dtype != lhs.dtype:
        raise TypeError(f"rhs must have lhs' dtype {lhs.dtype}, got {rhs.dtype}")
    if rhs.shape[1] != lhs.shape[1]:
        raise ValueError(f"rhs must have shape [G, K={lhs.shape[1]}, N] to match lhs {lhs.shape}, got {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes must have shape [G] = ({rhs.shape[0]},) like rhs, got {group_sizes.shape}")
    if group_sizes.dtype != jnp.int32:
        group_sizes = jnp.clip(group_sizes, 0, lhs.shape[0]).astype(jnp.int32)
    return _grouped_matmul(*match_manual_axes(lhs, rhs, group_sizes))


# ------------------------------------------------------------------ checking
def _check_int(x, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {x.dtype}")
    return x


def _to_int32(values, bound: int) -> jax.Array:
    """int32 values; wider integers outside [0, bound) become -1 instead of wrapping into range."""
    if values.dtype == jnp.int32:
        return values
    info = jnp.iinfo(values.dtype)
    if info.min >= -(2**31) and info.max <= _INT32_MAX:  # int8/16, uint8/16: exact
        return values.astype(jnp.int32)
    return jnp.where((values >= 0) & (values < bound), values, -1).astype(jnp.int32)


def _sort_chunk(pairs: int, num_experts: int) -> int:
    """Pairs per counting-sort chunk: _SORT_CHUNK, or more when the chunk x bucket table would exceed the cap."""
    buckets = num_experts + 1
    if -(-pairs // _SORT_CHUNK) * buckets <= _SORT_MAX_COUNTS:
        return _SORT_CHUNK
    max_chunks = max(1, _SORT_MAX_COUNTS // buckets)
    chunk = -(-pairs // max_chunks)
    return -(-chunk // 32) * 32


def _sort_workspace(batches: int, pairs: int, num_experts: int, chunk: int) -> int:
    """int32 elements of the sort workspace (PermuteWorkspace in src/permute_row.h)."""
    return batches * (num_experts + 1) * (-(-pairs // chunk) + 1)


@functools.lru_cache(maxsize=None)
def _gmm_workspace(op: int, dtype: int, m: int, k: int, n: int, g: int) -> int:
    """Bytes of grouped matmul workspace: asked of the CUDA extension, 0 without one."""
    query = getattr(_ffi._jax_moe_cuda, "gmm_workspace_bytes", None)
    return int(query(op, dtype, m, k, n, g)) if query is not None else 0


# ---------------------------------------------------------------- custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _permute(x, indices, num_experts: int, topk: int):
    return _permute_fwd(x, indices, num_experts, topk)[0]


def _permute_fwd(x, indices, num_experts, topk):
    chunk = _sort_chunk(indices.shape[1] * topk, num_experts)
    x_sorted, group_sizes, sort_map, pos, _ = permute_fwd_p.bind(x, indices, num_experts=num_experts, chunk=chunk)
    return (x_sorted, group_sizes, sort_map), pos


def _permute_bwd(num_experts, topk, pos, cotangents):
    dx_sorted = cotangents[0]  # group_sizes and sort_map are integers: no cotangent
    (dx,) = permute_bwd_p.bind(dx_sorted, pos, topk=topk)
    return dx, None


_permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def _unpermute(y_sorted, sort_map, weights):
    return _unpermute_fwd(y_sorted, sort_map, weights)[0]


def _unpermute_fwd(y_sorted, sort_map, weights):
    y, pos = unpermute_fwd_p.bind(y_sorted, sort_map, weights)
    return y, (y_sorted, sort_map, pos, weights)


def _unpermute_bwd(residuals, dy):
    y_sorted, sort_map, pos, weights = residuals
    dy_sorted, dweights = unpermute_bwd_p.bind(dy, y_sorted, sort_map, pos, weights)
    return dy_sorted, None, dweights


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


@jax.custom_vjp
def _grouped_matmul(lhs, rhs, group_sizes):
    return gmm_fwd_p.bind(lhs, rhs, group_sizes)[0]


def _grouped_matmul_fwd(lhs, rhs, group_sizes):
    return gmm_fwd_p.bind(lhs, rhs, group_sizes)[0], (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(residuals, dout):
    lhs, rhs, group_sizes = residuals
    dlhs = gmm_dlhs_p.bind(dout, rhs, group_sizes)[0]
    drhs = gmm_drhs_p.bind(lhs, dout, group_sizes)[0]
    return dlhs, drhs, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


# ---------------------------------------------------------------- primitives
def _permute_fwd_abstract(x, indices, *, num_experts, chunk):
    batches, tokens, hidden = x.shape
    pairs = tokens * indices.shape[2]
    return (derived_aval(x, (batches, pairs, hidden), x.dtype),
            derived_aval(x, (batches, num_experts), jnp.int32),
            derived_aval(x, (batches, pairs), jnp.int32), derived_aval(x, (batches, pairs), jnp.int32),
            derived_aval(x, (_sort_workspace(batches, pairs, num_experts, chunk),), jnp.int32))


def _permute_bwd_abstract(dx_sorted, pos, *, topk):
    batches, pairs, hidden = dx_sorted.shape
    return (derived_aval(dx_sorted, (batches, pairs // topk, hidden), dx_sorted.dtype),)


def _unpermute_fwd_abstract(y_sorted, sort_map, weights):
    batches, tokens, _ = weights.shape
    return (derived_aval(y_sorted, (batches, tokens, y_sorted.shape[2]), y_sorted.dtype),
            derived_aval(y_sorted, sort_map.shape, jnp.int32))


def _unpermute_bwd_abstract(dy, y_sorted, sort_map, pos, weights):
    return (derived_aval(dy, y_sorted.shape, y_sorted.dtype), derived_aval(dy, weights.shape, weights.dtype))


def _gmm_abstract(op):
    def abstract(a, b, group_sizes):
        dtype = _GEMM_DTYPES[jnp.dtype(a.dtype)]
        if op == _GEMM_FWD:  # lhs [M, K], rhs [G, K, N] -> [M, N]
            (m, k), n, shape = a.shape, b.shape[2], (a.shape[0], b.shape[2])
        elif op == _GEMM_DLHS:  # dout [M, N], rhs [G, K, N] -> [M, K]
            (m, n), k, shape = a.shape, b.shape[1], (a.shape[0], b.shape[1])
        else:  # lhs [M, K], dout [M, N] -> [G, K, N]
            (m, k), n, shape = a.shape, b.shape[1], (group_sizes.shape[0], a.shape[1], b.shape[1])
        workspace = _gmm_workspace(op, dtype, m, k, n, group_sizes.shape[0])
        return derived_aval(a, shape, a.dtype), derived_aval(a, (workspace,), jnp.uint8)

    return abstract


def _stacked_batch(num_workspaces):
    """vmap rule of the permute primitives: their leading dim is already a batch of independent
    problems, so the vmapped dim is merged into it and the kernel runs once for the whole batch.
    The last `num_workspaces` outputs are scratch: returned unbatched."""

    def rule(prim, args, dims, **params):
        size = batch_size(args, dims)
        args = move_batch_to_front(args, dims, size)
        inner = args[0].shape[1]  # the primitive's own batch dim, shared by every operand
        merged = [a.reshape(size * inner, *a.shape[2:]) for a in args]
        outs = prim.bind(*merged, **params)
        kept = len(outs) - num_workspaces
        results = [o.reshape(size, inner, *o.shape[1:]) for o in outs[:kept]] + list(outs[kept:])
        return results, (0,) * kept + (None,) * num_workspaces

    return rule


def _gmm_batch(prim, args, dims, **params):
    """vmap rule of the grouped matmuls: one kernel call per batch element (lax.map); unbatched
    operands (typically the expert weights) are closed over, never broadcast."""
    batched = [i for i, d in enumerate(dims) if d is not None]
    mapped = tuple(jnp.moveaxis(args[i], dims[i], 0) for i in batched)

    def one(xs):
        full = list(args)
        for i, x in zip(batched, xs):
            full[i] = x
        return tuple(prim.bind(*full, **params))

    return list(jax.lax.map(one, mapped)), (0, 0)


permute_fwd_p = kernel_primitive("jax_moe_permute_fwd", _permute_fwd_abstract, _stacked_batch(1))
permute_bwd_p = kernel_primitive("jax_moe_permute_bwd", _permute_bwd_abstract, _stacked_batch(0))
unpermute_fwd_p = kernel_primitive("jax_moe_unpermute_fwd", _unpermute_fwd_abstract, _stacked_batch(0))
unpermute_bwd_p = kernel_primitive("jax_moe_unpermute_bwd", _unpermute_bwd_abstract, _stacked_batch(0))
gmm_fwd_p = kernel_primitive("jax_moe_gmm_fwd", _gmm_abstract(_GEMM_FWD), _gmm_batch)
gmm_dlhs_p = kernel_primitive("jax_moe_gmm_dlhs", _gmm_abstract(_GEMM_DLHS), _gmm_batch)
gmm_drhs_p = kernel_primitive("jax_moe_gmm_drhs", _gmm_abstract(_GEMM_DRHS), _gmm_batch)
