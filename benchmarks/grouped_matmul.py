"""jax_moe.grouped_matmul vs jax.lax.ragged_dot, tokamax and a dense jnp.dot.

The six shapes of baseline.md §4 (M=32768, bf16, rhs scaled by 1/sqrt(K),
group sizes random and roughly balanced: Dirichlet α=50, fixed seed),
forward and forward+backward (grads w.r.t. lhs and rhs via jax.vjp; flops
3x the forward). The dense row is jnp.dot([M,K], [K,N]): the upper bound.
XLA's ragged_dot expands lhs G-fold on GPU (up to 138 ms a call): it gets 3
timed calls. tokamax (implementation="mosaic") runs only where it imports.

    python3 benchmarks/grouped_matmul.py    # JAX_MOE_BENCH_SMOKE=1 for CPU
"""
import importlib.util
import sys
import types

import common
from common import SMOKE, jax, np

import jax.numpy as jnp

BF16, F32 = jnp.bfloat16, jnp.float32
# (label, G, M, K, N)
SHAPES = [("dsv3-ep8 gate_up", 32, 32768, 7168, 4096),
          ("dsv3-ep8 down", 32, 32768, 2048, 7168),
          ("mixtral gate_up", 8, 32768, 4096, 28672),
          ("mixtral down", 8, 32768, 14336, 4096),
          ("qwen3-30b gate_up", 128, 32768, 2048, 1536),
          ("qwen3-30b down", 128, 32768, 768, 2048)]
if SMOKE:
    SHAPES = [(lb, g, 512, k // 32, n // 32) for lb, g, _, k, n in SHAPES]
SLOW = dict(max_iters=3, wall_reps=1)  # XLA ragged_dot: 3 calls suffice


def balanced_group_sizes(G, M, seed, alpha=50.0):
    """Random group sizes summing to M, every group non-empty."""
    rng = np.random.default_rng(seed)
    gs = np.floor(rng.dirichlet(np.full(G, alpha)) * M).astype(np.int64)
    gs[rng.choice(G, size=int(M - gs.sum()), replace=False)] += 1
    assert gs.sum() == M and (gs > 0).all()
    return gs.astype(np.int32)


def load_tokamax():
    """tokamax.ragged_dot (mosaic), or None with the reason printed."""
    if importlib.util.find_spec("tokamax") is None:
        print("SKIP tokamax: not installed", flush=True)
        return None
    try:
        import xprof.cli.tools  # noqa: F401
    except Exception:  # tokamax imports xprof only for its own profiler
        stub = types.ModuleType("xprof.cli.tools")
        stub.get_kernel_stats_tool = None
        sys.modules.update({"xprof": types.ModuleType("xprof"),
                            "xprof.cli": types.ModuleType("xprof.cli"),
                            "xprof.cli.tools": stub})
    try:
        import tokamax
    except Exception as e:
        print(f"SKIP tokamax: {type(e).__name__}: {e}", flush=True)
        return None
    return lambda lhs, rhs, gs: tokamax.ragged_dot(
        lhs, rhs, gs, implementation="mosaic")


def make_fwd(fn):
    return jax.jit(fn)


def make_fwd_bwd(fn):
    def fwd_bwd(lhs, rhs, gs, cot):
        out, vjp = jax.vjp(lambda a, b: fn(a, b, gs), lhs, rhs)
        return (out,) + vjp(cot)
    return jax.jit(fwd_bwd)


def dense(lhs, rhs, gs):
    del gs  # same M, K, N as one dense product: the upper bound
    return jnp.dot(lhs, rhs)


def hi_dot(a, b):
    return jnp.dot(a.astype(F32), b.astype(F32),
                   precision=jax.lax.Precision.HIGHEST)


def check(fn, lhs, rhs, gs_np, cot, rows_per_group=4):
    """rel err of out, dlhs (sampled rows per group) and drhs (first and
    last group) vs float32 HIGHEST."""
    out, dlhs, drhs = make_fwd_bwd(fn)(lhs, rhs, jnp.asarray(gs_np), cot)
    starts = np.concatenate([[0], np.cumsum(gs_np)[:-1]])
    num, den = {"out": 0.0, "dlhs": 0.0}, {"out": 0.0, "dlhs": 0.0}
    for g, (s, n) in enumerate(zip(starts, gs_np)):
        r = s + np.linspace(0, n - 1, rows_per_group).astype(int)
        for name, got, ref in (("out", out[r], hi_dot(lhs[r], rhs[g])),
                               ("dlhs", dlhs[r], hi_dot(cot[r], rhs[g].T))):
            num[name] += float(jnp.sum((got.astype(F32) - ref) ** 2))
            den[name] += float(jnp.sum(ref ** 2))
    errs = {k: (num[k] / den[k]) ** 0.5 for k in num}
    dr = [(drhs[g], hi_dot(lhs[s:s + n].T, cot[s:s + n]))
          for g, s, n in ((0, 0, gs_np[0]),
                          (len(gs_np) - 1, starts[-1], gs_np[-1]))]
    errs["drhs"] = common.rel_err(np.concatenate([np.ravel(a.astype(F32))
                                                  for a, _ in dr]),
                                  np.concatenate([np.ravel(b) for _, b in dr]))
    return ", ".join(f"{k} rel err {v:.2e}" for k, v in errs.items())


def bench_shape(impls, label, G, M, K, N, key):
    k1, k2, k3 = jax.random.split(key, 3)
    lhs = jax.random.normal(k1, (M, K), BF16)
    rhs = (jax.random.normal(k2, (G, K, N), F32) / np.sqrt(K)).astype(BF16)
    cot = jax.random.normal(k3, (M, N), BF16)
    gs_np = balanced_group_sizes(G, M, seed=G + K)
    gs = jnp.asarray(gs_np)
    tag = f"{label} G={G} K={K} N={N}"
    note = f"{tag}: groups {gs_np.min()}..{gs_np.max()}"
    if "jax_moe" in impls:
        msg = common.try_call(f"check {tag}", check, impls["jax_moe"], lhs,
                              rhs, gs_np, cot)
        note += f"; jax_moe {msg or 'check ERROR (see log)'}"
        print(note, flush=True)
    flops = 2 * M * K * N
    bytes_ = (M * K + G * K * N + M * N) * 2
    rows = []
    for pas, maker, mult in (("fwd", make_fwd, 1),
                             ("fwd+bwd", make_fwd_bwd, 3)):
        recs = {}
        for name, fn in impls.items():
            args = (lhs, rhs[0] if name == "dense" else rhs, gs)
            args += (cot,) if pas == "fwd+bwd" else ()
            recs[name] = common.measure(
                f"{name:<10} {tag} {pas}", maker(fn), [args],
                flops=mult * flops, bytes_=mult * bytes_,
                **(SLOW if name == "ragged_dot" else {}))
        rows.append(dict(label=label, pas=pas, **recs))
    return rows, note


def summary(rows):
    headers = ["shape", "pass", "jax_moe µs", "TFLOP/s", "k",
               "× compute floor", "of dense", "vs ragged_dot", "vs tokamax",
               "ragged_dot µs", "tokamax µs", "dense µs", "dense TFLOP/s"]
    out = []
    for r in rows:
        m = r.get("jax_moe")
        m_ok = common.ok(m)

        def us(name):
            rec = r.get(name)
            return "ERR" if rec and "error" in rec else (rec or {}).get("us")
        out.append([r["label"], r["pas"], us("jax_moe"),
                    m.get("tflops") if m_ok else None,
                    m.get("kernels") if m_ok else None,
                    m.get("x_compute_floor") if m_ok else None,
                    common.speedup(r.get("dense"), m),  # = fraction of dense
                    common.speedup(r.get("ragged_dot"), m),
                    common.speedup(r.get("tokamax"), m),
                    us("ragged_dot"), us("tokamax"), us("dense"),
                    (r.get("dense") or {}).get("tflops")])
    return common.md_table(headers, out)


def main():
    moe = common.load_module("jax_moe")
    impls = {}
    gm = common.get_fn(moe, "grouped_matmul")
    if gm:
        impls["jax_moe"] = gm
    impls["ragged_dot"] = jax.lax.ragged_dot
    tok = load_tokamax()
    if tok:
        impls["tokamax"] = tok
    impls["dense"] = dense
    rows, notes = [], []
    for i, (label, G, M, K, N) in enumerate(SHAPES):
        r, note = bench_shape(impls, label, G, M, K, N, jax.random.key(i))
        rows += r
        notes.append(f"- {note}")
    body = "\n".join(
        [f"M={SHAPES[0][2]}, bf16; TFLOP/s = 2·M·K·N (×3 for fwd+bwd) / "
         f"time; compute floor at {common.MATMUL_PEAK / 1e12:.0f} TFLOP/s; "
         "'of dense' = dense time / jax_moe time; 'vs X' = X time / jax_moe "
         "time. ragged_dot: 3 timed calls.", ""] + notes
        + ["", summary(rows)])
    common.publish("grouped_matmul", "grouped matmul: jax_moe vs "
                   "ragged_dot / tokamax / dense", body)


if __name__ == "__main__":
    main()
