"""The whole MoE layer, forward+backward: jax_moe.flax.MoE vs the same layer
written the way MaxText writes it today.

Configs (bf16 activations and weights; float32 router logits and bias):
- dsv3-ep8: one rank of DeepSeek-V3 under 8-way expert parallelism: its 32
  local experts, H=7168, I=2048, 4096 tokens (4 sequences of 1024), top-8
  with DeepSeek-V3 routing (sigmoid, correction bias, 8 groups of which 4
  stay eligible, renormalised, x2.5) and the sequence-wise aux loss. The
  all-to-all is left out: both layers process the same 32768 token-expert
  rows on 32 experts.
- qwen3-30b-a3b: Qwen3-30B-A3B on one device: 128 experts, H=2048, I=768,
  4096 tokens, softmax top-8 renormalised, batch aux loss.
Routed experts only (no shared expert), as MaxText's RoutedMoE.

The anchor ("maxtext") is pure JAX as MaxText writes it: router logits in
float32, routing with jax.lax.top_k, group masks and take_along_axis, the aux
loss from one_hot means, an argsort permutation through MaxText's custom-VJP
gather (_sort_activations), jax.lax.ragged_dot for the three expert matmuls,
and the inverse gather + einsum to combine. The jax_moe layer is
jax_moe.flax.MoE (route / route_with_aux_loss, aux_loss, permute,
grouped_matmul, unpermute). Each runs as one jit(value_and_grad) of
sum(out * cot) + aux with respect to x and every weight.

Parts, each timed alone (forward+backward, on that layer's own
intermediates): router (gate matmul, routing, aux loss; differentiated in the
gate weight and the tokens only), permute, gate_up
(two grouped matmuls + SwiGLU), down (one grouped matmul), unpermute. A
part's share is its time over the sum of the parts. XLA's ragged_dot takes
tens of ms a call on GPU: the anchor's timings use 3 calls.

    python3 benchmarks/moe_layer.py         # JAX_MOE_BENCH_SMOKE=1 for CPU
"""
import common
from common import SMOKE, jax, np

import jax.numpy as jnp

BF16, F32 = jnp.bfloat16, jnp.float32
SLOW = dict(max_iters=3, wall_reps=1)
TARGET_SPEEDUP = 5.0
PARTS = ("router", "permute", "gate_up", "down", "unpermute")
# (label, MoEConfig preset, sizes, batch shape)
CONFIGS = [
    ("dsv3-ep8", "deepseek_v3",
     dict(num_experts=32, hidden_size=7168, intermediate_size=2048),
     (4, 1024)),
    ("qwen3-30b-a3b", "qwen3_moe",
     dict(num_experts=128, hidden_size=2048, intermediate_size=768),
     (4, 1024)),
]
if SMOKE:
    CONFIGS = [(label, preset, dict(sizes, hidden_size=128,
                                    intermediate_size=64), (2, 64))
               for label, preset, sizes, _ in CONFIGS]
NEEDED = ("route", "route_with_aux_loss", "aux_loss", "aux_loss_scores",
          "tokens_per_expert", "permute", "unpermute", "grouped_matmul")


# ---------------------------------------------------- the MaxText anchor
@jax.custom_vjp
def sort_activations(x, sort_indices):
    """MaxText's _sort_activations: a gather whose backward is a gather."""
    return x[sort_indices]


def _sort_fwd(x, sort_indices):
    return x[sort_indices], sort_indices


def _sort_bwd(sort_indices, g):
    return g[jnp.argsort(sort_indices)], None


sort_activations.defvjp(_sort_fwd, _sort_bwd)


def maxtext_routing(logits, bias, cfg):
    """MaxText get_topk / deepseek_routing: (weights, indices)."""
    k = cfg.num_experts_per_tok
    if cfg.score_function == "softmax":  # softmax over the top-k logits
        top_logits, idx = jax.lax.top_k(logits, k)
        return jax.nn.softmax(top_logits, axis=-1), idx
    scores = jax.nn.sigmoid(logits)
    biased = scores + bias
    if cfg.num_groups:  # keep the groups with the best top-2 sums
        grouped = biased.reshape(-1, cfg.num_groups,
                                 cfg.num_experts // cfg.num_groups)
        group_scores = jax.lax.top_k(grouped, k // cfg.group_topk)[0].sum(-1)
        _, kept = jax.lax.top_k(group_scores, cfg.group_topk)
        mask = jax.nn.one_hot(kept, cfg.num_groups).sum(-2) > 0
        biased = jnp.where(mask[..., None], grouped,
                           -jnp.inf).reshape(biased.shape)
    _, idx = jax.lax.top_k(biased, k)
    weights = jnp.take_along_axis(scores, idx, -1)
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.scaling_factor, idx


def maxtext_aux_loss(logits, cfg, batch_shape):
    """Switch loss E·coeff·Σ_e f_e·P_e from one_hot means (f normalised to
    sum 1, as jax_moe), over all tokens or per sequence and averaged."""
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    if cfg.score_function == "softmax":
        probs = jax.nn.softmax(logits, -1)
    else:
        s = jax.nn.sigmoid(logits)
        probs = s / (s.sum(-1, keepdims=True) + 1e-20)
    groups = batch_shape[0] if cfg.aux_loss_type == "sequence" else 1
    probs = probs.reshape(groups, -1, e)
    _, idx = jax.lax.top_k(probs, k)
    density = jax.nn.one_hot(idx, e).sum(-2).mean(-2) / k
    density_prob = probs.mean(-2)
    return cfg.aux_loss_coeff * e * jnp.mean(
        jnp.sum(density * density_prob, -1))


def maxtext_parts(cfg, bias, batch_shape):
    def router(p, tokens):
        logits = tokens.astype(F32) @ p["gate_kernel"].astype(F32)
        weights, idx = maxtext_routing(logits, bias, cfg)
        return weights, idx, maxtext_aux_loss(logits, cfg, batch_shape)

    def permute(tokens, idx, num_experts):
        flat = idx.reshape(-1)
        sort_indices = jnp.argsort(flat)
        replicated = jnp.repeat(tokens, idx.shape[-1], axis=0)
        x_sorted = sort_activations(replicated, sort_indices)
        group_sizes = jnp.bincount(flat, length=num_experts)
        return x_sorted, group_sizes, sort_indices

    def gate_up(x_sorted, wi_0, wi_1, group_sizes):
        gate = jax.lax.ragged_dot(x_sorted, wi_0, group_sizes)
        up = jax.lax.ragged_dot(x_sorted, wi_1, group_sizes)
        return (jax.nn.silu(gate.astype(F32)) * up.astype(F32)).astype(BF16)

    def down(hidden, wo, group_sizes):
        return jax.lax.ragged_dot(hidden, wo, group_sizes)

    def unpermute(y_sorted, sort_indices, weights):
        pairs = sort_activations(y_sorted, jnp.argsort(sort_indices))
        pairs = pairs.reshape(*weights.shape, -1).astype(F32)
        return jnp.einsum("tkh,tk->th", pairs,
                          weights).astype(y_sorted.dtype)

    return dict(router=router, permute=permute, gate_up=gate_up, down=down,
                unpermute=unpermute)


def chain(parts, num_experts):
    """The layer (p, x) -> (out, aux) from its parts."""
    def layer(p, x):
        tokens = x.reshape(-1, x.shape[-1])
        weights, idx, aux = parts["router"](p, tokens)
        x_sorted, group_sizes, sort_map = parts["permute"](tokens, idx,
                                                           num_experts)
        hidden = parts["gate_up"](x_sorted, p["wi_0"], p["wi_1"],
                                  group_sizes)
        y_sorted = parts["down"](hidden, p["wo"], group_sizes)
        out = parts["unpermute"](y_sorted, sort_map, weights)
        return out.reshape(x.shape), aux
    return layer


# ---------------------------------------------------------- jax_moe side
class JaxMoeLayer:
    """jax_moe.flax.MoE with its weights taken from a dict at call time."""

    def __init__(self, flax_mod, cfg, bias):
        from flax import nnx
        self.nnx = nnx
        self.moe = flax_mod.MoE(cfg, rngs=nnx.Rngs(0))
        if self.moe.e_score_correction_bias is not None:
            self.moe.e_score_correction_bias[...] = bias
        self.graphdef, self.params, self.rest = nnx.split(
            self.moe, nnx.Param, ...)

    def weights(self):
        """The layer's weights as the anchor's dict."""
        return {name: self.params[name][...]
                for name in ("gate_kernel", "wi_0", "wi_1", "wo")}

    def bound(self, p):
        """The module, traced, holding the weights of p."""
        params = self.nnx.State(self.params)
        for name, value in p.items():
            params[name] = params[name].replace(value)
        return self.nnx.merge(self.graphdef, params, self.rest)

    def __call__(self, p, x):
        out = self.bound(p)(x)
        return out.output, out.aux_loss

    def parts(self, moe, batch_shape):
        def router(p, tokens):
            routing, aux = self.bound(p).route(tokens,
                                               batch_shape=batch_shape)
            return routing.weights, routing.indices, aux

        def gate_up(x_sorted, wi_0, wi_1, group_sizes):
            gate = moe.grouped_matmul(x_sorted, wi_0, group_sizes)
            up = moe.grouped_matmul(x_sorted, wi_1, group_sizes)
            return (jax.nn.silu(gate.astype(F32))
                    * up.astype(F32)).astype(BF16)

        return dict(router=router, permute=moe.permute, gate_up=gate_up,
                    down=moe.grouped_matmul, unpermute=moe.unpermute)


# ---------------------------------------------------------------- timing
def layer_step(layer):
    """jit (p, x, cot) -> (loss, (d p, d x))."""
    def loss(p, x, cot):
        out, aux = layer(p, x)
        return jnp.sum(out.astype(F32) * cot) + aux
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def vjp_step(fn, num_diff):
    """jit (*args, cot) -> (first output, grads of the first num_diff args)
    for the cotangent cot on fn's first output (others get none)."""
    def step(*args):
        *args, cot = args
        diff, rest = args[:num_diff], args[num_diff:]
        first, vjp = jax.vjp(lambda *d: _first(fn(*d, *rest)), *diff)
        return first, vjp(cot)
    return jax.jit(step)


def _first(outs):
    return outs[0] if isinstance(outs, tuple) else outs


def part_cases(parts, p, x, num_experts, key):
    """{part: (step, args)}: every part on the layer's own intermediates."""
    tokens = x.reshape(-1, x.shape[-1])
    weights, idx, _ = jax.jit(parts["router"])(p, tokens)
    x_sorted, group_sizes, sort_map = jax.jit(
        parts["permute"], static_argnums=2)(tokens, idx, num_experts)
    hidden = jax.jit(parts["gate_up"])(x_sorted, p["wi_0"], p["wi_1"],
                                       group_sizes)
    y_sorted = jax.jit(parts["down"])(hidden, p["wo"], group_sizes)
    keys = iter(jax.random.split(key, 5))

    def cot(like):
        return jax.random.normal(next(keys), like.shape, F32).astype(
            like.dtype)

    # The router differentiates its own weight only: through p, its VJP would
    # also write the experts' weights' zero gradients (GBs), which are not
    # part of the layer's router cost.
    others = {name: w for name, w in p.items() if name != "gate_kernel"}

    def router(gate, tokens, others):
        return parts["router"]({**others, "gate_kernel": gate}, tokens)

    return {
        "router": (vjp_step(router, 2),
                   (p["gate_kernel"], tokens, others, cot(weights))),
        "permute": (vjp_step(lambda t, i: parts["permute"](t, i, num_experts),
                             1), (tokens, idx, cot(x_sorted))),
        "gate_up": (vjp_step(parts["gate_up"], 3),
                    (x_sorted, p["wi_0"], p["wi_1"], group_sizes,
                     cot(hidden))),
        "down": (vjp_step(parts["down"], 2),
                 (hidden, p["wo"], group_sizes, cot(y_sorted))),
        "unpermute": (vjp_step(lambda y, w, s: parts["unpermute"](y, s, w),
                               2), (y_sorted, weights, sort_map,
                                    cot(tokens))),
    }


def check(jm_step, mt_step, p, x, cot):
    """jax_moe vs the anchor on the same inputs: loss, d x, d weights."""
    (loss, (dp, dx)), (loss_ref, (dp_ref, dx_ref)) = (jm_step(p, x, cot),
                                                      mt_step(p, x, cot))
    errs = {"loss": common.rel_err(loss, loss_ref),
            "dx": common.rel_err(dx.astype(F32), dx_ref.astype(F32))}
    for name in dp:
        errs[f"d{name}"] = common.rel_err(dp[name].astype(F32),
                                          dp_ref[name].astype(F32))
    return ", ".join(f"{k} rel err {v:.1e}" for k, v in errs.items())


def bench_config(flax_mod, moe, label, preset, sizes, batch_shape, key):
    """Time both layers end to end and by part; rows for the tables."""
    cfg = getattr(flax_mod.MoEConfig, preset)(
        **sizes, num_shared_experts=0, dtype=BF16, param_dtype=BF16)
    k_bias, k_x, k_cot, k_parts = jax.random.split(key, 4)
    bias = 0.01 * jax.random.normal(k_bias, (cfg.num_experts,), F32)
    layer = JaxMoeLayer(flax_mod, cfg, bias)
    p = layer.weights()
    x = jax.random.normal(k_x, (*batch_shape, cfg.hidden_size), BF16)
    cot = jax.random.normal(k_cot, x.shape, BF16)
    tokens = int(np.prod(batch_shape))
    mt_parts = maxtext_parts(cfg, bias, batch_shape)
    impls = {"maxtext": (chain(mt_parts, cfg.num_experts), mt_parts, SLOW)}
    if moe is not None:
        impls["jax_moe"] = (layer, layer.parts(moe, batch_shape), {})
    note = f"{label}: E={cfg.num_experts}, H={cfg.hidden_size}, " \
           f"I={cfg.intermediate_size}, T={tokens}, k=" \
           f"{cfg.num_experts_per_tok}"
    if moe is not None:
        msg = common.try_call(f"check {label}", check,
                              layer_step(impls["jax_moe"][0]),
                              layer_step(impls["maxtext"][0]), p, x, cot)
        note += f"; jax_moe vs maxtext: {msg or 'check ERROR (see log)'}"
        print(note, flush=True)
    rows = {}
    for name, (full, parts, kw) in impls.items():
        rec = dict(full=common.measure(f"{name:<8} {label} layer fwd+bwd",
                                       layer_step(full), [(p, x, cot)],
                                       **kw))
        cases = common.try_call(f"{name} {label} parts", part_cases, parts,
                                p, x, cfg.num_experts, k_parts) or {}
        for part, (step, args) in cases.items():
            rec[part] = common.measure(f"{name:<8} {label} {part} fwd+bwd",
                                       step, [args], **kw)
        rows[name] = rec
    return dict(label=label, tokens=tokens, **rows), note


def summary(results):
    headers = ["config", "layer", "fwd+bwd ms", "tokens/s", "speed-up"] + [
        f"{part} %" for part in PARTS] + ["Σ parts ms"]
    out = []
    for r in results:
        for name in ("maxtext", "jax_moe"):
            rec = r.get(name)
            if rec is None:
                continue
            full = rec["full"]
            parts_us = [rec[p]["us"] if common.ok(rec.get(p)) else None
                        for p in PARTS]
            total = sum(u for u in parts_us if u) or None
            out.append(
                [r["label"], name,
                 full["us"] / 1e3 if common.ok(full) else "ERR",
                 r["tokens"] / full["us"] * 1e6 if common.ok(full) else None,
                 common.speedup(r["maxtext"]["full"], full)
                 if name == "jax_moe" else None]
                + [100 * u / total if u and total else None
                   for u in parts_us]
                + [total / 1e3 if total else None])
    return common.md_table(headers, out)


def targets(results):
    lines = []
    for r in results:
        if "jax_moe" not in r:
            continue
        s = common.speedup(r["maxtext"]["full"], r["jax_moe"]["full"])
        verdict = "n/a" if s is None else (
            "PASS" if s >= TARGET_SPEEDUP else "MISS")
        lines.append(f"- TARGET {r['label']} layer fwd+bwd >= "
                     f"{TARGET_SPEEDUP:.0f}x the MaxText-style layer: "
                     + (f"{s:.2f}x -> {verdict}" if s else verdict))
    return "\n".join(lines)


def main():
    moe = common.load_module("jax_moe")
    flax_mod = common.load_module("jax_moe.flax")
    if flax_mod is None:
        print("SKIP moe_layer: jax_moe.flax does not import", flush=True)
        return
    if not all([common.get_fn(moe, name) for name in NEEDED]):
        moe = None  # the anchor still runs
    results, notes = [], []
    for i, (label, preset, sizes, batch_shape) in enumerate(CONFIGS):
        r, note = bench_config(flax_mod, moe, label, preset, sizes,
                               batch_shape, jax.random.key(i))
        results.append(r)
        notes.append(f"- {note}")
    body = "\n".join(
        ["Forward+backward of the whole routed-MoE layer (bf16). tokens/s "
         "= tokens / layer time; speed-up = MaxText-style time / jax_moe "
         "time; part shares from each part timed alone (their sum is shown "
         "next to the layer time). maxtext: 3 timed calls.", ""]
        + notes + ["", targets(results), "", summary(results)])
    common.publish("moe_layer", "MoE layer: jax_moe.flax.MoE vs a "
                   "MaxText-style layer (jnp routing + ragged_dot)", body)


if __name__ == "__main__":
    main()
