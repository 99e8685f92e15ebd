"""route_with_aux_loss: routing and its aux loss from one fused pass, against float64 NumPy and
against the unfused composition route + aux_loss_scores + aux_loss_from_logits (SPEC §2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jax_moe
import np_reference

DSV3 = dict(score_function="sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5)

# (E, topk, route kwargs, aux_topk, aux_score_function): one case per kernel path and score function.
CASES = [
    (8, 2, {}, None, None),                                        # thread per token, softmax
    (32, 4, dict(score_function="sigmoid"), 3, "softmax"),         # thread per token, mixed functions
    (256, 8, DSV3, None, None),                                    # warp path with groups
    (130, 6, dict(score_function="sqrtsoftplus"), 40, None),       # warp routing, aux_topk > 32
    (64, 40, dict(score_function="softmax", use_pre_softmax=True), 8, "sigmoid"),  # generic (k > 32)
    (1500, 4, dict(score_function="sigmoid"), 4, None),            # generic (E > 1024)
    # Backward rows kept in registers, per aux score function (DSv3 above: sigmoid).
    (128, 8, dict(score_function="sqrtsoftplus"), None, "softmax"),
    (96, 4, dict(score_function="sigmoid"), None, "sqrtsoftplus"),
]


def _logits(rng, tokens, experts, dtype=np.float32):
    """Well-separated random logits with a per-row shift (never zeros, never sorted)."""
    x = rng.normal(size=(tokens, experts)) * 2.0 + rng.normal(size=(tokens, 1))
    return jnp.asarray(x.astype(np.float32)).astype(dtype)


def _clean_scores(x, score_function):
    x = np.asarray(x, np.float64)
    if score_function == "softmax":
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    a = 1 / (1 + np.exp(-x)) if score_function == "sigmoid" else np.sqrt(np.log1p(np.exp(x)))
    return a / (a.sum(-1, keepdims=True) + 1e-20)


def _np_aux_loss(x, aux_topk, aux_score_function, coeff):
    """Float64 loss: C_coeff · Σ_e (Σ_t s[t, e]) · tpe[e], tpe the top-aux_topk counts of s."""
    s = _clean_scores(x, aux_score_function)
    tokens, experts = s.shape
    top = np.argsort(-s, axis=-1, kind="stable")[:, :aux_topk]
    tpe = np.bincount(top.ravel(), minlength=experts)
    c_coeff = experts * coeff / (aux_topk * tokens**2)
    return c_coeff * float(s.sum(0) @ tpe), tpe, c_coeff


def _aux_kwargs(route_kwargs, aux_topk, aux_score_function):
    kw = dict(route_kwargs, aux_coeff=0.01)
    if aux_topk is not None:
        kw["aux_topk"] = aux_topk
    if aux_score_function is not None:
        kw["aux_score_function"] = aux_score_function
    return kw


@pytest.mark.parametrize("experts,topk,route_kwargs,aux_topk,aux_sf", CASES)
def test_matches_numpy_and_route(rng, experts, topk, route_kwargs, aux_topk, aux_sf):
    x = _logits(rng, 97, experts)
    routing, loss = jax_moe.route_with_aux_loss(x, topk, **_aux_kwargs(route_kwargs, aux_topk, aux_sf))
    plain = jax_moe.route(x, topk, **route_kwargs)
    np.testing.assert_array_equal(routing.indices, plain.indices)
    np.testing.assert_allclose(routing.weights, plain.weights, rtol=1e-6, atol=1e-7)
    ref = np_reference.route(np.asarray(x), topk, **route_kwargs)
    clear = np_reference.is_unambiguous(ref.margin)
    np.testing.assert_array_equal(np.asarray(routing.indices)[clear], ref.indices[clear])
    sf = aux_sf or route_kwargs.get("score_function", "softmax")
    ref_loss, _, _ = _np_aux_loss(np.asarray(x), aux_topk or topk, sf, 0.01)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)


@pytest.mark.parametrize("experts,topk,route_kwargs,aux_topk,aux_sf", CASES)
def test_gradient_is_routing_plus_aux_gradient(rng, experts, topk, route_kwargs, aux_topk, aux_sf):
    x = _logits(rng, 41, experts)
    cot = jnp.asarray(rng.normal(size=(41, topk)).astype(np.float32))
    loss_weight = 50.0
    kw = _aux_kwargs(route_kwargs, aux_topk, aux_sf)

    def fused(x):
        routing, loss = jax_moe.route_with_aux_loss(x, topk, **kw)
        return jnp.sum(routing.weights * cot) + loss_weight * loss

    sf = aux_sf or route_kwargs.get("score_function", "softmax")
    _, tpe, c_coeff = _np_aux_loss(np.asarray(x), aux_topk or topk, sf, 0.01)
    want = _np_gradient(x, cot, topk, route_kwargs, sf, loss_weight * c_coeff * tpe)
    np.testing.assert_allclose(jax.grad(fused)(x), want, rtol=1e-4, atol=1e-6)


def _np_gradient(x, cot, topk, route_kwargs, aux_score_function, dscores):
    """Float64 d logits of sum(weights · cot) + the aux loss whose d clean scores are dscores [E] (SPEC §2)."""
    x64 = np.asarray(x, np.float64)
    s = _clean_scores(x64, aux_score_function)
    if aux_score_function == "softmax":
        aux_grad = s * (dscores - (s * dscores).sum(-1, keepdims=True))
    else:
        sigmoid = 1 / (1 + np.exp(-x64))
        a = sigmoid if aux_score_function == "sigmoid" else np.sqrt(np.log1p(np.exp(x64)))
        da = a * (1 - a) if aux_score_function == "sigmoid" else sigmoid / (2 * a)
        total = a.sum(-1, keepdims=True) + 1e-20
        aux_grad = (dscores - (dscores * a).sum(-1, keepdims=True) / total) / total * da
    return np_reference.route_vjp(x64, topk, np.asarray(cot, np.float64), **route_kwargs) + aux_grad


# DeepSeek-V3's config and Qwen3-MoE's router shape (128 experts, softmax, top 8) have fused kernels compiled
# for them (routing_cuda.cu, kFixedRoute), at 32 lanes a token below 4096 tokens and 8 from there, where
# DeepSeek-V3's selects on float values (select_on_floats). Tied logits (4 values) test the tie rule of their
# counts, read from the primitive: in the loss, one count moved between tied experts changes too little to see.
COMPILED_CONFIGS = {  # E, route kwargs, with a bias, _route_config's (num_groups, group_topk, scaling_factor)
    "deepseek_v3": (256, DSV3, True, (8, 4, 2.5)),
    "qwen3": (128, dict(score_function="softmax"), False, (None, None, 1.0)),
}


@pytest.mark.parametrize("tokens", [203, 4099])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", COMPILED_CONFIGS)
def test_compiled_config_counts(rng, name, dtype, tied, tokens):
    experts, kwargs, with_bias, (groups, group_topk, scaling) = COMPILED_CONFIGS[name]
    score_function = kwargs["score_function"]
    if tied:
        x = jnp.asarray(rng.choice((-1.25, 0.5, 1.0, 2.0), size=(tokens, experts)), dtype)
    else:  # bf16 values in every dtype: float32 ones come within rounding of each other, and the float64 counts
        x = _logits(rng, tokens, experts, jnp.bfloat16).astype(dtype)  # then break those ties otherwise
    bias = jnp.asarray(rng.choice((-0.25, 0.0, 0.25), size=experts), jnp.float32) if with_bias else None
    routing, loss = jax_moe.route_with_aux_loss(x, 8, aux_coeff=1e-2, expert_bias=bias, **kwargs)
    plain = jax_moe.route(x, 8, expert_bias=bias, **kwargs)
    np.testing.assert_array_equal(routing.indices, plain.indices)
    np.testing.assert_allclose(routing.weights, plain.weights, rtol=1e-6, atol=1e-7)
    ref_loss, ref_counts, _ = _np_aux_loss(np.asarray(x.astype(jnp.float32)), 8, score_function, 1e-2)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)
    _, counts = _statistics(x, bias, score_function, groups, group_topk, scaling)
    np.testing.assert_array_equal(counts, ref_counts)


def _statistics(x, bias, score_function, num_groups, group_topk, scaling):
    """The fused forward's column sums and top-8 counts, read from the primitive (route_with_aux_loss keeps them)."""
    experts = x.shape[-1]
    config = jax_moe.routing._route_config(experts, 8, score_function, num_groups, group_topk, None, False, None, None,
                                           scaling)
    out = jax_moe.routing.route_aux_fwd_p.bind(
        x, jax_moe.routing._check_bias(bias, experts), **config._asdict(), aux_topk=8,
        aux_score_function=jax_moe.routing.checks.score_function(score_function), c_coeff=1.0)
    return np.asarray(out[2]), np.asarray(out[3])


# From 4096 tokens on, the CUDA forward takes DeepSeek-V3's rows 8 lanes a token, 32 tokens a block: rows of ties (more
# candidates than a segment's buffer), rows whose best clean score is ~100x the 8th, NaN rows. 8195 tokens end on a
# part-filled block; 20003 make the blocks loop (the grid is capped by the workspace's 512 rows).
DSV3_STATISTICS = ("sigmoid", DSV3["num_groups"], DSV3["group_topk"], DSV3["scaling_factor"])


@pytest.mark.parametrize("tokens", [8195, 20003])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_deepseek_v3_many_tokens_statistics(rng, dtype, tokens):
    x = np.asarray(_logits(rng, tokens, 256), np.float64)
    tied = rng.choice(tokens, tokens // 8, replace=False)
    x[tied] = rng.choice((-1.25, 0.5, 1.0, 2.0), size=(len(tied), 256))
    far = rng.choice(tokens, 64, replace=False)  # one clean score ~100x the 8th best
    x[far] = rng.normal(size=(64, 256)) - 8.0
    x[far, rng.integers(0, 256, 64)] = 5.0
    x = jnp.asarray(x, dtype)
    bias = jnp.asarray(rng.choice((-0.25, 0.0, 0.25), size=256), jnp.float32)
    colsum, counts = _statistics(x, bias, *DSV3_STATISTICS)
    x32 = np.asarray(x.astype(jnp.float32))
    np.testing.assert_allclose(colsum, _clean_scores(x32, "sigmoid").sum(0), rtol=1e-5)
    ref_loss, ref_counts, _ = _np_aux_loss(x32, 8, "sigmoid", 1e-2)
    np.testing.assert_array_equal(counts, ref_counts)
    routing, loss = jax_moe.route_with_aux_loss(x, 8, aux_coeff=1e-2, expert_bias=bias, **DSV3)
    plain = jax_moe.route(x, 8, expert_bias=bias, **DSV3)
    np.testing.assert_array_equal(routing.indices, plain.indices)
    np.testing.assert_allclose(routing.weights, plain.weights, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_deepseek_v3_many_tokens_nan_rows(rng, dtype):
    x = np.asarray(_logits(rng, 8195, 256), np.float64)
    x[rng.choice(8195, 5, replace=False), rng.integers(0, 256, 5)] = np.nan
    x = jnp.asarray(x, jnp.bfloat16).astype(dtype)  # float32: bf16 values, far from float32 near-ties
    colsum, counts = _statistics(x, None, *DSV3_STATISTICS)
    assert np.isnan(colsum).all()
    # A NaN row's clean scores are all NaN: they tie, and rank the lowest 8 experts first.
    _, ref_counts, _ = _np_aux_loss(np.asarray(x.astype(jnp.float32)), 8, "sigmoid", 1e-2)
    np.testing.assert_array_equal(counts, ref_counts)


def test_bf16_logits_and_bias_dtype(rng):
    x = _logits(rng, 64, 256, jnp.bfloat16)
    bias = jnp.asarray(rng.normal(size=256).astype(np.float32) * 0.1)
    routing, loss = jax_moe.route_with_aux_loss(x, 8, aux_coeff=1e-3, expert_bias=bias, **DSV3)
    plain = jax_moe.route(x, 8, expert_bias=bias, **DSV3)
    np.testing.assert_array_equal(routing.indices, plain.indices)
    ref_loss, _, _ = _np_aux_loss(np.asarray(x.astype(jnp.float32)), 8, "sigmoid", 1e-3)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)
    dx = jax.grad(lambda x: jax_moe.route_with_aux_loss(x, 8, aux_coeff=1e-3, expert_bias=bias, **DSV3)[1])(x)
    assert dx.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_gradient_is_the_float32_gradient_rounded(rng, dtype):
    """16-bit logits (d logits computed in float32, rounded once) against float32 logits of the same
    values, on an odd token count (the CUDA backward has a DeepSeek-V3 kernel for 16-bit rows)."""
    x = _logits(rng, 75, 256, dtype)
    cot = jnp.asarray(rng.normal(size=(75, 8)).astype(np.float32))

    def fused(x):
        routing, loss = jax_moe.route_with_aux_loss(x, 8, aux_coeff=1e-2, **DSV3)
        return jnp.sum(routing.weights * cot) + 50.0 * loss

    got = jax.grad(fused)(x)
    want = jax.grad(fused)(x.astype(jnp.float32))
    assert got.dtype == dtype
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=8e-3, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradient_of_nan_rows_stays_in_those_rows(rng, dtype):
    """A NaN logit makes its row's d logits NaN (its clean-score sum is NaN); the other rows' d logits are the
    float64 ones, with the NaN rows' counts (experts 0-7) in the aux loss. 75 tokens: some warps of the CUDA
    backward hold a NaN row and clean ones."""
    x = np.asarray(_logits(rng, 75, 256, dtype).astype(jnp.float32), np.float64)
    nan_rows = np.array([0, 9, 42, 74])
    x[nan_rows, rng.integers(0, 256, len(nan_rows))] = np.nan
    cot = rng.normal(size=(75, 8)).astype(np.float32)
    loss_weight = 50.0

    def fused(x):
        routing, loss = jax_moe.route_with_aux_loss(x, 8, aux_coeff=1e-2, **DSV3)
        return jnp.sum(routing.weights * cot) + loss_weight * loss

    got = np.asarray(jax.grad(fused)(jnp.asarray(x, dtype)).astype(jnp.float32))
    assert np.isnan(got[nan_rows]).all()
    _, tpe, c_coeff = _np_aux_loss(x, 8, "sigmoid", 1e-2)
    others = np.setdiff1d(np.arange(75), nan_rows)
    want = _np_gradient(x[others], cot[others], 8, DSV3, "sigmoid", loss_weight * c_coeff * tpe)
    tolerance = dict(rtol=1e-4, atol=1e-6) if dtype == jnp.float32 else dict(rtol=8e-3, atol=1e-6)
    np.testing.assert_allclose(got[others], want, **tolerance)


def test_deterministic(rng):
    x = _logits(rng, 3000, 256)
    f = jax.jit(lambda x: jax_moe.route_with_aux_loss(x, 8, aux_coeff=0.01, **DSV3)[1])
    g = jax.jit(jax.grad(lambda x: jax_moe.route_with_aux_loss(x, 8, aux_coeff=0.01, **DSV3)[1]))
    losses = {float(f(x)) for _ in range(5)}
    assert len(losses) == 1
    first = np.asarray(g(x))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(g(x)), first)


def test_no_tokens():
    routing, loss = jax_moe.route_with_aux_loss(jnp.ones((0, 16), jnp.float32) * 0.5, 2, aux_coeff=0.01)
    assert routing.weights.shape == (0, 2) and float(loss) == 0.0


def test_topk_reduce_func(rng):
    x = _logits(rng, 33, 64)
    kw = dict(score_function="sigmoid", topk_reduce_func=lambda v: jnp.max(v, -1, keepdims=True))
    routing, _ = jax_moe.route_with_aux_loss(x, 4, aux_coeff=0.01, **kw)
    np.testing.assert_allclose(routing.weights, jax_moe.route(x, 4, **kw).weights, rtol=1e-6)


def test_vmap_is_a_batch_of_independent_losses(rng):
    xs = jnp.stack([_logits(rng, 40, 32), _logits(rng, 40, 32)])
    f = lambda x: jax_moe.route_with_aux_loss(x, 4, aux_coeff=0.01)[1]
    np.testing.assert_allclose(jax.vmap(f)(xs), [f(xs[0]), f(xs[1])], rtol=1e-6)
    grads = jax.vmap(jax.grad(f))(xs)
    np.testing.assert_allclose(grads[1], jax.grad(f)(xs[1]), rtol=1e-5, atol=1e-9)


def _cpu_mesh():
    devices = jax.devices("cpu")
    if len(devices) < 4:
        pytest.skip("needs 4 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    return jax.sharding.Mesh(np.array(devices[:4]), ("x",), axis_types=(AxisType.Auto,))


def test_jit_with_token_sharded_logits_is_global(rng):
    mesh = _cpu_mesh()
    x = jax.device_put(_logits(rng, 64, 256), jax.devices("cpu")[0])
    f = lambda x: jax_moe.route_with_aux_loss(x, 8, aux_coeff=0.01, **DSV3)
    full_routing, full_loss = f(x)
    sharded = jax.device_put(x, NamedSharding(mesh, P("x", None)))
    routing, loss = jax.jit(f)(sharded)
    np.testing.assert_array_equal(routing.indices, full_routing.indices)
    np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-6)
    assert "all-gather" not in jax.jit(f).lower(sharded).compile().as_text()
    grad = jax.jit(jax.grad(lambda x: f(x)[1]))(sharded)
    np.testing.assert_allclose(grad, jax.grad(lambda x: f(x)[1])(x), rtol=1e-5, atol=1e-10)


def test_shard_map_with_axis_name_is_global(rng):
    mesh = _cpu_mesh()
    x = jax.device_put(_logits(rng, 64, 32), jax.devices("cpu")[0])

    def per_shard(x):
        routing, loss = jax_moe.route_with_aux_loss(x, 4, aux_coeff=0.01, axis_name="x")
        return routing.weights, loss

    sharded = jax.device_put(x, NamedSharding(mesh, P("x", None)))
    mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=P("x"), out_specs=(P("x"), P()))
    weights, loss = jax.jit(mapped)(sharded)
    full_routing, full_loss = jax_moe.route_with_aux_loss(x, 4, aux_coeff=0.01)
    np.testing.assert_allclose(weights, full_routing.weights, rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-6)
    # The backward's d scores take the global counts and the loss cotangent, both replicated.
    grad = jax.jit(jax.grad(lambda x: mapped(x)[1]))(sharded)
    full_grad = jax.grad(lambda x: jax_moe.route_with_aux_loss(x, 4, aux_coeff=0.01)[1])(x)
    np.testing.assert_allclose(grad, full_grad, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(aux_topk=0), ValueError),
        (dict(aux_topk=17), ValueError),
        (dict(aux_topk=2.0), TypeError),
        (dict(aux_score_function="relu"), ValueError),
        (dict(aux_coeff="big"), TypeError),
    ],
)
def test_bad_input(kwargs, error):
    args = {"aux_coeff": 0.01, **kwargs}
    with pytest.raises(error, match="aux"):
        jax_moe.route_with_aux_loss(jnp.ones((4, 16), jnp.float32), 2, **args)
