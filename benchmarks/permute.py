"""jax_moe.permute / unpermute vs pure JAX (argsort + take / segment-sum).

H=7168, T=4096, k=8, E=256, bf16 (DeepSeek-V3 tokens), forward and
forward+backward (permute: grad w.r.t. x; unpermute: grads w.r.t. y_sorted
and weights). Min bytes: every input read once and every output written
once, except that unpermute's backward reads y_sorted again: d weights
needs it, and the cotangent exists only after the forward has read it. The
copy floor is min bytes / 3.0 TB/s. Target: <= 1.3x that floor.

    python3 benchmarks/permute.py           # JAX_MOE_BENCH_SMOKE=1 for CPU
"""
import common
from common import SMOKE, jax

import jax.numpy as jnp

F32, BF16 = jnp.float32, jnp.bfloat16
T, H, K, E = (128, 256, 8, 32) if SMOKE else (4096, 7168, 8, 256)
TARGET_X_FLOOR = 1.3


def jax_permute(x, indices, num_experts):
    """Pure JAX, for indices in [0, E): stable sort by expert, then take."""
    k = indices.shape[-1]
    flat = indices.reshape(-1)
    sort_map = jnp.argsort(flat, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return x[sort_map // k], group_sizes, sort_map


def jax_unpermute(y_sorted, sort_map, weights):
    """Pure JAX: weight each row, segment-sum rows back to their token."""
    t, k = weights.shape
    w = weights.reshape(-1)[sort_map]
    y = jax.ops.segment_sum(y_sorted.astype(F32) * w[:, None], sort_map // k,
                            num_segments=t)
    return y.astype(y_sorted.dtype)


def make_inputs(key):
    """Random tokens, distinct experts per token, weights and cotangents."""
    kx, ki, kw, ky, kc, kd = jax.random.split(key, 6)
    x = jax.random.normal(kx, (T, H), BF16)
    idx = jax.lax.top_k(jax.random.uniform(ki, (T, E)), K)[1]
    w = jax.nn.softmax(jax.random.normal(kw, (T, K), F32), -1)
    sort_map = jax.jit(jax_permute, static_argnums=2)(x, idx, E)[2]
    return dict(x=x, idx=idx, w=w, sort_map=sort_map,
                y_sorted=jax.random.normal(ky, (T * K, H), BF16),
                cot_sorted=jax.random.normal(kc, (T * K, H), BF16),
                cot=jax.random.normal(kd, (T, H), BF16))


# (op, pass) -> (function maker, input names, min bytes)
def cases():
    row, tok, pair = T * K * H * 2, T * H * 2, T * K * 4
    p_fwd = tok + pair + row + E * 4 + pair
    u_fwd = row + pair + pair + tok

    def permute_fwd(fn):
        return jax.jit(lambda x, idx: fn(x, idx, E))

    def permute_fwd_bwd(fn):
        def f(x, idx, cot):
            def split(a):  # only x_sorted is differentiable
                xs, gs, sm = fn(a, idx, E)
                return xs, (gs, sm)
            xs, vjp, (gs, sm) = jax.vjp(split, x, has_aux=True)
            return xs, gs, sm, vjp(cot)[0]
        return jax.jit(f)

    def unpermute_fwd(fn):
        return jax.jit(fn)

    def unpermute_fwd_bwd(fn):
        def f(ys, sm, w, cot):
            y, vjp = jax.vjp(lambda a, b: fn(a, sm, b), ys, w)
            return (y,) + vjp(cot)
        return jax.jit(f)

    return {("permute", "fwd"): (permute_fwd, ("x", "idx"), p_fwd),
            ("permute", "fwd+bwd"): (permute_fwd_bwd,
                                     ("x", "idx", "cot_sorted"),
                                     p_fwd + row + tok),
            ("unpermute", "fwd"): (unpermute_fwd, ("y_sorted", "sort_map",
                                                   "w"), u_fwd),
            ("unpermute", "fwd+bwd"): (unpermute_fwd_bwd,
                                       ("y_sorted", "sort_map", "w", "cot"),
                                       u_fwd + tok + row + row + pair)}


def check(impls, anchors, key):
    """jax_moe vs pure JAX on fresh inputs, forward and gradients."""
    d = make_inputs(key)
    msgs = []
    for (op, pas), (maker, names, _) in cases().items():
        if op not in impls:
            continue
        args = [d[n] for n in names]
        got = jax.tree.leaves(maker(impls[op])(*args))
        ref = jax.tree.leaves(maker(anchors[op])(*args))
        errs = [common.rel_err(g, r) for g, r in zip(got, ref)]
        msgs.append(f"{op} {pas}: max rel err over outputs {max(errs):.1e}")
    return "; ".join(msgs)


def main():
    moe = common.load_module("jax_moe")
    ref = common.load_module("jax_moe.reference") if moe else None
    anchors, note = {}, {}
    for op, inline in (("permute", jax_permute),
                       ("unpermute", jax_unpermute)):
        fn = common.get_fn(ref, op, quiet=True)
        anchors[op] = fn or inline
        note[op] = "jax_moe.reference" if fn else "inline pure JAX"
    impls = {op: fn for op in anchors if (fn := common.get_fn(moe, op))}
    checks = []
    if impls:
        msg = common.try_call("check", check, impls, anchors,
                              jax.random.key(100))
        checks = [f"- check: {msg or 'ERROR (see log)'}"]
        print(checks[0], flush=True)
    sets = common.make_sets(make_inputs, jax.random.key(0))
    rows, lines = [], []
    for (op, pas), (maker, names, bytes_) in cases().items():
        arg_sets = [tuple(s[n] for n in names) for s in sets]
        recs = {"anchor": common.measure(f"anchor   {op} {pas}",
                                         maker(anchors[op]), arg_sets,
                                         bytes_=bytes_)}
        if op in impls:
            recs["jax_moe"] = common.measure(f"jax_moe  {op} {pas}",
                                             maker(impls[op]), arg_sets,
                                             bytes_=bytes_)
        rows.append([op, pas] + common.compare_cells(
            bytes_, recs["anchor"], recs.get("jax_moe")))
        m = recs.get("jax_moe")
        floor = bytes_ / common.MEM_BW * 1e6
        lines.append(common.target_line(
            f"{op} {pas} <= {TARGET_X_FLOOR}x copy floor",
            m["us"] if common.ok(m) else None, TARGET_X_FLOOR * floor))
    body = "\n".join(
        [f"T={T}, H={H}, k={K}, E={E}, bf16; anchors: permute = "
         f"{note['permute']}, unpermute = {note['unpermute']}.", ""]
        + checks + [""] + lines + ["", common.md_table(
            ["op", "pass"] + common.COMPARE_HEADERS, rows)])
    common.publish("permute", "permute / unpermute: jax_moe vs pure JAX",
                   body)


if __name__ == "__main__":
    main()
