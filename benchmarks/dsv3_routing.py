"""DeepSeek-V3 routing, quick: GPU time per call of route and route_with_aux_loss, forward and
forward+backward, at T in {64, 16384, 65536} (bf16 logits, E=256, 8 groups, top-4 groups, k=8,
sigmoid, bias, scaling 2.5), with the kernels each call launches.

The before/after check while working on the routing kernel (about 30 s on an H100): no anchors, no
RESULTS.md section; `benchmarks/routing.py` is the full benchmark.

    python3 benchmarks/dsv3_routing.py      # JAX_MOE_BENCH_SMOKE=1 for CPU
"""
import common
from common import SMOKE, jax

import jax.numpy as jnp
import jax_moe

DSV3 = dict(score_function="sigmoid", num_groups=8, group_topk=4, scaling_factor=2.5)
TOKENS = (64, 256) if SMOKE else (64, 16384, 65536)


def inputs(key, tokens):
    x = jax.random.normal(key, (tokens, 256), jnp.float32).astype(jnp.bfloat16)
    cot = jax.random.normal(jax.random.fold_in(key, 1), (tokens, 8), jnp.float32)
    bias = 0.1 * jax.random.normal(jax.random.fold_in(key, 2), (256,), jnp.float32)
    return x, cot, bias


def route_fwd(x, cot, bias):
    return jax_moe.route(x, 8, expert_bias=bias, **DSV3).weights


def route_fwd_bwd(x, cot, bias):
    return jax.grad(lambda x: jnp.sum(route_fwd(x, cot, bias) * cot))(x)


def aux_fwd(x, cot, bias):
    routing, loss = jax_moe.route_with_aux_loss(x, 8, aux_coeff=1e-2, expert_bias=bias, **DSV3)
    return routing.weights, loss


def aux_fwd_bwd(x, cot, bias):
    def f(x):
        weights, loss = aux_fwd(x, cot, bias)
        return jnp.sum(weights * cot) + loss
    return jax.grad(f)(x)


def main():
    calls = (("route fwd", route_fwd), ("route fwd+bwd", route_fwd_bwd),
             ("route_with_aux_loss fwd", aux_fwd), ("route_with_aux_loss fwd+bwd", aux_fwd_bwd))
    for tokens in TOKENS:
        sets = common.make_sets(lambda k: inputs(k, tokens), jax.random.key(tokens))
        for name, f in calls:
            common.measure(f"dsv3 T={tokens} {name}", jax.jit(f), sets)


if __name__ == "__main__":
    main()
