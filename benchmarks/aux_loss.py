"""jax_moe aux-loss paths vs pure JAX, forward and forward+backward.

1. aux_loss(probs, tpe) vs jax_moe.reference.aux_loss (or inline);
2. aux_loss_from_logits(logits, tpe) vs its pure-JAX composition (softmax
   or normalised sigmoid, then the loss);
   both at E in {64, 256, 1024, 4096, 16384}, T=16384, f32 and bf16.
   Target on every row: GPU time <= max(1.3 x floor, floor + 3 µs) and no
   slower than pure JAX.
3. route_with_aux_loss (DeepSeek-V3 config, T=16384 bf16) vs jax_moe.route
   alone (target <= 1.5x route) and vs the pure-JAX composition;
4. aux_loss_scores (forward) vs pure JAX (the clean scores, lax.top_k,
   bincount) at E in {64, 256, 1024}: timed, no target.
fwd+bwd = jit(value_and_grad) w.r.t. probs / logits. Min bytes: fwd reads
the input and tpe and writes the scalar; fwd+bwd also writes the gradient,
and for from_logits reads the logits again: d logits depends on them, and
the cotangent only exists after the forward has read them once.

    python3 benchmarks/aux_loss.py          # JAX_MOE_BENCH_SMOKE=1 for CPU
"""
import common
import routing
from common import SMOKE, jax

import jax.numpy as jnp

F32, BF16 = jnp.float32, jnp.bfloat16
TOPK, COEFF = 8, 1e-2
T = 256 if SMOKE else 16384
ES = (64, 256) if SMOKE else (64, 256, 1024, 4096, 16384)
DTYPES = (F32, BF16)
SCORE_FNS = ("softmax", "sigmoid")


def inline_aux_loss(probs, tpe, *, topk, coeff):
    """Pure-JAX aux loss (SPEC §2), for when jax_moe.reference lacks it."""
    t, c = probs.shape
    scale = c * coeff / (topk * t * t)
    loss = scale * jnp.sum(probs.astype(F32).sum(0) * tpe.astype(F32))
    return loss.astype(probs.dtype)


def clean_scores(logits, score_function):
    """softmax, or sigmoid normalised over E (the aux loss's scores)."""
    x = logits.astype(F32)
    if score_function == "softmax":
        return jax.nn.softmax(x, -1)
    s = jax.nn.sigmoid(x)
    return s / (s.sum(-1, keepdims=True) + 1e-20)


def composed_from_logits(aux_loss):
    def from_logits(logits, tpe, *, topk, coeff, score_function="softmax"):
        return aux_loss(clean_scores(logits, score_function), tpe, topk=topk,
                        coeff=coeff)
    return from_logits


def composed_route_with_aux(route, aux_loss):
    """Pure JAX: route, then counts of the clean top-k, then the loss."""
    def route_with_aux(logits, topk, *, aux_coeff, **kw):
        r = route(logits, topk, **kw)
        s = clean_scores(logits, kw.get("score_function", "softmax"))
        tpe = jnp.bincount(jax.lax.top_k(s, topk)[1].reshape(-1),
                           length=s.shape[-1])
        return r, aux_loss(s, tpe, topk=topk, coeff=aux_coeff)
    return route_with_aux


# ------------------------------------------------------- aux-loss paths

def make_fwd(fn, kw):
    return jax.jit(lambda x, tpe: fn(x, tpe, topk=TOPK, coeff=COEFF, **kw))


def make_fwd_bwd(fn, kw):
    return jax.jit(jax.value_and_grad(
        lambda x, tpe: fn(x, tpe, topk=TOPK, coeff=COEFF, **kw)))


def make_inputs(key, t, e, dt, probs):
    """(probs or logits, tokens_per_expert): random, never zeros."""
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (t, e), F32)
    x = (jax.nn.softmax(x, -1) if probs else x).astype(dt)
    tpe = jax.random.randint(k2, (e,), 1, 2 * t * TOPK // e + 2, jnp.int32)
    return x, tpe


def check_path(new, anchor, kw, probs, key):
    """loss and gradient of jax_moe vs the anchor on fresh inputs."""
    x, tpe = make_inputs(key, 128 if SMOKE else 1024, 256, F32, probs)
    l1, g1 = make_fwd_bwd(new, kw)(x, tpe)
    l2, g2 = make_fwd_bwd(anchor, kw)(x, tpe)
    return (f"loss rel err {common.rel_err(l1, l2):.1e}, grad rel err "
            f"{common.rel_err(g1, g2):.1e}")


def bench_path(path, impls, kw, probs, key):
    rows = []
    for e in ES:
        for dt in DTYPES:
            isz = jnp.dtype(dt).itemsize
            fwd_bytes = T * e * isz + e * 4 + 4
            bwd_passes = 1 if probs else 2  # write d probs | read logits, write d logits
            bytes_ = {"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + bwd_passes * T * e * isz}
            key, sub = jax.random.split(key)
            sets = common.make_sets(
                lambda kk: make_inputs(kk, T, e, dt, probs), sub)
            for pas, maker in (("fwd", make_fwd), ("fwd+bwd", make_fwd_bwd)):
                label = f"{path:<20} E={e:<6} {jnp.dtype(dt).name:<8} {pas}"
                recs = {tag: common.measure(f"{tag:<8} {label}",
                                            maker(fn, kw), sets,
                                            bytes_=bytes_[pas])
                        for tag, fn in impls.items()}
                rows.append(dict(path=path, E=e, dtype=jnp.dtype(dt).name,
                                 pas=pas, bytes=bytes_[pas], **recs))
            del sets
    return rows


def floor_target_us(bytes_):
    floor = bytes_ / common.MEM_BW * 1e6
    return max(1.3 * floor, floor + 3.0)


def verdicts(r):
    """(floor target µs, PASS/MISS vs it, PASS/MISS vs pure JAX)."""
    m, a, tgt = r.get("jax_moe"), r["anchor"], floor_target_us(r["bytes"])
    if not common.ok(m):
        return tgt, None, None
    vs_jax = ("PASS" if m["us"] <= a["us"] else "MISS") if common.ok(a) \
        else None
    return tgt, "PASS" if m["us"] <= tgt else "MISS", vs_jax


def path_table(rows):
    headers = (["path", "E", "dtype", "pass"] + common.COMPARE_HEADERS
               + ["target µs", "≤ target", "≤ pure JAX"])
    return common.md_table(headers, [
        [r["path"], r["E"], r["dtype"], r["pas"]]
        + common.compare_cells(r["bytes"], r["anchor"], r.get("jax_moe"))
        + list(verdicts(r)) for r in rows])


def path_targets(rows):
    lines = []
    for i, what in ((1, "GPU time <= max(1.3 x floor, floor + 3 µs)"),
                    (2, "no slower than pure JAX")):
        v = [(r, verdicts(r)[i]) for r in rows]
        done = [(r, x) for r, x in v if x]
        miss = [f"{r['path']} E={r['E']} {r['dtype']} {r['pas']}"
                for r, x in done if x == "MISS"]
        more = f" and {len(miss) - 8} more (see table)" if len(miss) > 8 \
            else ""
        lines.append(f"- TARGET aux paths, {what}: {len(done) - len(miss)}/"
                     f"{len(done)} PASS ({len(v) - len(done)} not measured)"
                     + (f"; MISS: {'; '.join(miss[:8])}{more}" if miss
                        else ""))
    return lines


# ------------------------------------------------------ aux_loss_scores

SCORES_ES = (64, 256) if SMOKE else (64, 256, 1024)


def composed_scores(logits, topk, *, score_function="softmax"):
    """Pure JAX: the clean scores, then the counts of each row's top-k."""
    s = clean_scores(logits, score_function)
    tpe = jnp.bincount(jax.lax.top_k(s, topk)[1].reshape(-1),
                       length=s.shape[-1])
    return s, tpe.astype(jnp.int32)


def bench_scores(impls, key):
    """Forward: reads the logits, writes float32 scores and int32 counts."""
    rows = []
    for e in SCORES_ES:
        for dt in DTYPES:
            bytes_ = T * e * (jnp.dtype(dt).itemsize + 4) + e * 4
            key, sub = jax.random.split(key)
            sets = common.make_sets(
                lambda kk: make_inputs(kk, T, e, dt, False)[:1], sub)
            label = f"aux_loss_scores E={e:<6} {jnp.dtype(dt).name:<8} fwd"
            recs = {tag: common.measure(
                        f"{tag:<8} {label}",
                        jax.jit(lambda x, fn=fn: fn(x, TOPK)), sets,
                        bytes_=bytes_)
                    for tag, fn in impls.items()}
            rows.append(dict(E=e, dtype=jnp.dtype(dt).name, bytes=bytes_,
                             **recs))
            del sets
    return rows


def scores_table(rows):
    return common.md_table(
        ["E", "dtype"] + common.COMPARE_HEADERS,
        [[r["E"], r["dtype"]]
         + common.compare_cells(r["bytes"], r["anchor"], r.get("jax_moe"))
         for r in rows])


# ------------------------------------------------- route_with_aux_loss

def rwal_fwd(fn):
    def fwd(x, bias):
        r, loss = fn(x, TOPK, aux_coeff=COEFF, expert_bias=bias,
                     **routing.DSV3)
        return r[0], r[1], loss
    return jax.jit(fwd)


def rwal_fwd_bwd(fn):
    def loss(x, cot, bias):
        r, aux = fn(x, TOPK, aux_coeff=COEFF, expert_bias=bias,
                    **routing.DSV3)
        return jnp.sum(r[0] * cot) + aux, (r[0], r[1], aux)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def check_rwal(new, anchor, key):
    x, cot, bias = routing.make_inputs(key, 128 if SMOKE else 1024, 256,
                                       TOPK, BF16, True)
    (_, (w1, i1, l1)), g1 = rwal_fwd_bwd(new)(x, cot, bias)
    (_, (w2, i2, l2)), g2 = rwal_fwd_bwd(anchor)(x, cot, bias)
    same = float(jnp.mean(jnp.all(i1 == i2, -1)))
    return (f"indices equal in {same * 100:.2f}% rows, weights rel err "
            f"{common.rel_err(w1, w2):.1e}, loss rel err "
            f"{common.rel_err(l1, l2):.1e}, dlogits rel err "
            f"{common.rel_err(g1.astype(F32), g2.astype(F32)):.1e}")


def bench_rwal(impls, key):
    """impls: name -> (fwd, fwd+bwd) jitted functions."""
    e, isz = 256, 2
    fwd_bytes = T * e * isz + e * 4 + T * TOPK * 8 + 4
    bytes_ = {"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + T * TOPK * 4
              + T * e * isz}
    sets = common.make_sets(
        lambda kk: routing.make_inputs(kk, T, e, TOPK, BF16, True), key)
    fwd_sets = [(x, b) for x, _, b in sets]
    rows = []
    for pas, i, arg_sets in (("fwd", 0, fwd_sets), ("fwd+bwd", 1, sets)):
        for name, fns in impls.items():
            rec = common.measure(f"{name:<26} dsv3 T={T} bf16 {pas}",
                                 fns[i], arg_sets, bytes_=bytes_[pas])
            rows.append(dict(impl=name, pas=pas, **rec))
    return rows


def rwal_report(rows):
    route = {r["pas"]: r for r in rows if r["impl"] == "jax_moe.route"}
    lines = []
    for pas in ("fwd", "fwd+bwd"):
        new = next((r for r in rows if r["impl"] == "jax_moe" and
                    r["pas"] == pas and common.ok(r)), None)
        base = route.get(pas)
        both = new and common.ok(base)
        lines.append(common.target_line(
            f"route_with_aux_loss dsv3 T={T} bf16 {pas} <= 1.5x route",
            new["us"] if both else None, 1.5 * base["us"] if both else 0.0))
    # "× route" = this impl's time / route's time: speedup(r, route)
    table = common.md_table(
        ["impl", "pass", "µs", "k", "GB/s", "× floor", "× route"],
        [[r["impl"], r["pas"], r.get("us") if common.ok(r) else "ERR",
          r.get("kernels"), r.get("gbs"), r.get("x_mem_floor"),
          common.speedup(r, route.get(r["pas"]))] for r in rows])
    return lines, table


def main():
    moe = common.load_module("jax_moe")
    ref = common.load_module("jax_moe.reference") if moe else None
    ref_loss = common.get_fn(ref, "aux_loss", quiet=True)
    anchor_loss = ref_loss or inline_aux_loss
    anchor_note = ("jax_moe.reference.aux_loss" if ref_loss
                   else "inline pure JAX")
    print(f"aux_loss anchor: {anchor_note}", flush=True)
    key = jax.random.key(0)
    checks, rows = [], []
    paths = [("aux_loss", "aux_loss", anchor_loss, {}, True)] + [
        (f"from_logits {sf}", "aux_loss_from_logits",
         composed_from_logits(anchor_loss), dict(score_function=sf), False)
        for sf in SCORE_FNS]
    for i, (path, fname, anchor, kw, probs) in enumerate(paths):
        impls = {"anchor": anchor}
        new = common.get_fn(moe, fname)
        if new:
            impls["jax_moe"] = new
            what = f"- check {path}"
            msg = common.try_call(what, check_path, new, anchor, kw, probs,
                                  jax.random.key(100 + i))
            checks.append(f"{what}: {msg or 'ERROR (see log)'}")
            print(checks[-1], flush=True)
        key, sub = jax.random.split(key)
        rows += bench_path(path, impls, kw, probs, sub)

    route_anchor, route_note = routing.anchor_route(moe)
    composed = composed_route_with_aux(route_anchor, anchor_loss)
    rw_impls = {"pure JAX composition": (rwal_fwd(composed),
                                         rwal_fwd_bwd(composed))}
    route = common.get_fn(moe, "route")
    if route:
        rw_impls["jax_moe.route"] = (
            routing.make_fwd(route, TOPK, routing.DSV3),
            routing.make_fwd_bwd(route, TOPK, routing.DSV3))
    rwal = common.get_fn(moe, "route_with_aux_loss")
    if rwal:
        rw_impls["jax_moe"] = (rwal_fwd(rwal), rwal_fwd_bwd(rwal))
        what = "- check route_with_aux_loss"
        msg = common.try_call(what, check_rwal, rwal, composed,
                              jax.random.key(200))
        checks.append(f"{what}: {msg or 'ERROR (see log)'}")
        print(checks[-1], flush=True)
    rw_rows = bench_rwal(rw_impls, jax.random.key(1))
    rw_lines, rw_table = rwal_report(rw_rows)

    scores_impls = {"anchor": composed_scores}
    scores = common.get_fn(moe, "aux_loss_scores")
    if scores:
        scores_impls["jax_moe"] = scores
    scores_rows = bench_scores(scores_impls, jax.random.key(2))

    body = "\n".join(
        [f"Anchors: aux loss = {anchor_note}; routing = {route_note}.", ""]
        + checks + [""] + path_targets(rows) + rw_lines
        + ["", f"route_with_aux_loss, DeepSeek-V3 config, T={T}, bf16:", "",
           rw_table, "", f"Aux-loss paths, T={T} (jax_moe vs pure JAX):", "",
           path_table(rows), "",
           f"aux_loss_scores, softmax, k={TOPK}, T={T} (jax_moe vs pure JAX;"
           " no target):", "", scores_table(scores_rows)])
    common.publish("aux_loss", "aux loss: jax_moe vs pure JAX", body)


if __name__ == "__main__":
    main()
