"""jax_moe.route vs its pure-JAX anchor, forward and forward+backward.

Configs: DeepSeek-V3 (E=256, sigmoid, 8 groups, top-4 groups, k=8, f32
expert_bias, scaling 2.5), softmax top-k E=8 k=2 and E=128 k=8; T in
{64, 1024, 16384, 65536}; bf16 and f32 logits. The anchor is
jax_moe.reference.route, or an inline pure-JAX router when that is missing.
fwd+bwd = jit(value_and_grad(sum(weights * cot), has_aux)) w.r.t. logits.
Min bytes: fwd reads logits (+bias) and writes weights and indices; fwd+bwd
also reads cot and writes dlogits.

    python3 benchmarks/routing.py          # JAX_MOE_BENCH_SMOKE=1 for CPU
"""
import common
from common import SMOKE, jax, np

import jax.numpy as jnp

F32, BF16 = jnp.float32, jnp.bfloat16
DSV3 = dict(score_function="sigmoid", num_groups=8, group_topk=4,
            scaling_factor=2.5)
# (name, E, k, route kwargs, has f32 expert_bias)
CONFIGS = [("dsv3", 256, 8, DSV3, True),
           ("softmax E=8 k=2", 8, 2, {}, False),
           ("softmax E=128 k=8", 128, 8, {}, False)]
TS = (64, 256) if SMOKE else (64, 1024, 16384, 65536)
DTYPES = (BF16, F32)


def inline_route(logits, topk, *, score_function="softmax", expert_bias=None,
                 num_groups=None, group_topk=None, scaling_factor=1.0):
    """Pure-JAX stand-in for jax_moe.reference.route (the configs above)."""
    x = logits.astype(F32)
    bias = 0.0 if expert_bias is None else expert_bias.astype(F32)
    if score_function == "softmax":  # post-softmax: softmax over the k chosen
        _, idx = jax.lax.top_k(x + bias, topk)
        w = jax.nn.softmax(jnp.take_along_axis(x, idx, -1), -1)
        return w * scaling_factor, idx
    s = jax.nn.sigmoid(x)
    z = s + bias
    if num_groups:  # keep the group_topk groups with the best top-n sums
        g = z.reshape(*z.shape[:-1], num_groups, -1)
        n = max(1, topk // group_topk)
        gscore = jax.lax.top_k(g, n)[0].sum(-1)
        _, gidx = jax.lax.top_k(gscore, group_topk)
        keep = jax.nn.one_hot(gidx, num_groups, dtype=bool).any(-2)
        z = jnp.where(keep[..., None], g, -jnp.inf).reshape(z.shape)
    _, idx = jax.lax.top_k(z, topk)
    w = jnp.take_along_axis(s, idx, -1)
    w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * scaling_factor, idx


def make_fwd(route, k, kw):
    def fwd(x, *bias):
        w, idx = route(x, k, expert_bias=bias[0] if bias else None, **kw)
        return w, idx
    return jax.jit(fwd)


def make_fwd_bwd(route, k, kw):
    def loss(x, cot, *bias):
        w, idx = route(x, k, expert_bias=bias[0] if bias else None, **kw)
        return jnp.sum(w * cot), (w, idx)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def make_inputs(key, T, E, k, dt, has_bias):
    """(logits, cot, *bias): random, never zeros."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (T, E), F32).astype(dt)
    cot = jax.random.normal(k2, (T, k), F32)
    bias = (0.1 * jax.random.normal(k3, (E,), F32),) if has_bias else ()
    return (x, cot) + bias


def check(route, anchor, key, E, k, kw, has_bias, dt):
    """jax_moe vs anchor on fresh inputs: indices, weights, dlogits."""
    x, cot, *b = make_inputs(key, 1024 if not SMOKE else 128, E, k, dt,
                             has_bias)
    (_, (w, i)), g = make_fwd_bwd(route, k, kw)(x, cot, *b)
    (_, (wr, ir)), gr = make_fwd_bwd(anchor, k, kw)(x, cot, *b)
    same = float(np.mean(np.all(np.asarray(i) == np.asarray(ir), -1)))
    return (f"indices equal in {same * 100:.2f}% rows, weights rel err "
            f"{common.rel_err(w, wr):.1e}, dlogits rel err "
            f"{common.rel_err(g.astype(F32), gr.astype(F32)):.1e}")


def bench_case(impls, name, E, k, kw, has_bias, T, dt, key):
    """Time every impl fwd and fwd+bwd on shared input sets; rows out."""
    isz = jnp.dtype(dt).itemsize
    fwd_bytes = T * E * isz + (E * 4 if has_bias else 0) + T * k * 8
    bytes_ = {"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + T * k * 4 + T * E * isz}
    sets = common.make_sets(
        lambda kk: make_inputs(kk, T, E, k, dt, has_bias), key)
    fwd_sets = [(s[0],) + s[2:] for s in sets]
    rows = []
    for pas, maker, arg_sets in (("fwd", make_fwd, fwd_sets),
                                 ("fwd+bwd", make_fwd_bwd, sets)):
        recs = {tag: common.measure(
            f"{tag:<8} {name:<18} T={T:<6} {jnp.dtype(dt).name:<8} {pas}",
            maker(fn, k, kw), arg_sets, bytes_=bytes_[pas])
            for tag, fn in impls.items()}
        rows.append(dict(name=name, T=T, dtype=jnp.dtype(dt).name, pas=pas,
                         bytes=bytes_[pas], **recs))
    return rows


def summary(rows):
    headers = ["config", "T", "logits", "pass"] + common.COMPARE_HEADERS
    return common.md_table(headers, [
        [r["name"], r["T"], r["dtype"], r["pas"]]
        + common.compare_cells(r["bytes"], r["anchor"], r.get("jax_moe"))
        for r in rows])


def targets(rows):
    def us(name, T, dt, pas):
        for r in rows:
            m = r.get("jax_moe")
            if ((r["name"], r["T"], r["dtype"], r["pas"]) == (name, T, dt, pas)
                    and common.ok(m)):
                return m["us"]
        return None

    lines = [common.target_line("dsv3 T=16384 bf16 fwd",
                                us("dsv3", 16384, "bfloat16", "fwd"), 10.0),
             common.target_line("dsv3 T=16384 bf16 fwd+bwd",
                                us("dsv3", 16384, "bfloat16", "fwd+bwd"),
                                25.0)]
    for name, E, k, _, has_bias in CONFIGS:
        for dt in DTYPES:
            dn = jnp.dtype(dt).name
            floor = ((65536 * E * jnp.dtype(dt).itemsize + 65536 * k * 8
                      + (E * 4 if has_bias else 0)) / common.MEM_BW * 1e6)
            lines.append(common.target_line(
                f"{name} T=65536 {dn} fwd <= 1.5x memory floor",
                us(name, 65536, dn, "fwd"), 1.5 * floor))
            lines.append(common.target_line(f"{name} T=64 {dn} fwd <= 3 µs",
                                            us(name, 64, dn, "fwd"), 3.0))
    return "\n".join(lines)


def anchor_route(moe):
    """(jax_moe.reference.route or the inline stand-in, its name)."""
    ref = common.load_module("jax_moe.reference") if moe else None
    fn = common.get_fn(ref, "route", quiet=True)
    return (fn, "jax_moe.reference.route") if fn else (inline_route,
                                                       "inline pure JAX")


def main():
    moe = common.load_module("jax_moe")
    anchor, anchor_name = anchor_route(moe)
    impls = {"anchor": anchor}
    route = common.get_fn(moe, "route")
    if route:
        impls["jax_moe"] = route
    print(f"anchor: {anchor_name}", flush=True)
    key = jax.random.key(0)
    checks, rows = [], []
    for ci, (name, E, k, kw, has_bias) in enumerate(CONFIGS):
        for di, dt in enumerate(DTYPES):
            if route:
                what = f"- check {name} {jnp.dtype(dt).name}"
                msg = common.try_call(what, check, route, anchor,
                                      jax.random.key(100 + 2 * ci + di), E,
                                      k, kw, has_bias, dt)
                checks.append(f"{what}: {msg or 'ERROR (see log)'}")
                print(checks[-1], flush=True)
            for T in TS:
                key, sub = jax.random.split(key)
                rows += bench_case(impls, name, E, k, kw, has_bias, T, dt, sub)
    body = "\n".join([f"Anchor: {anchor_name}.", ""] + checks + [""]
                     + [targets(rows), "", summary(rows)])
    common.publish("routing", "routing: jax_moe.route vs anchor", body)


if __name__ == "__main__":
    main()
