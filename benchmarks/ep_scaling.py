"""Expert parallelism across the GPUs of one host: jax_moe.flax.MoE with
expert_axis under jax.shard_map, on 1, 2, 4 (and 8) GPUs.

Weak scaling at DeepSeek-V3 shapes: each GPU holds 32 experts (DeepSeek-V3's
256 under 8-way expert parallelism), H=7168, I=2048, and 4096 tokens (4
sequences of 1024), top-8 with DeepSeek-V3 routing and the sequence-wise aux
loss, no shared expert, bf16. On D GPUs the layer has 32·D experts and 4096·D
tokens, so the work per GPU stays the same and the all-to-alls grow. The send
buffers use capacity_factor 2 (each GPU sends at most 2·T·k/D rows to each
GPU); dropped token-expert pairs are counted and reported.

Per D: one jit(value_and_grad) step of sum(out · cot) + aux with respect to x
and every parameter.
- check: the EP step's output, aux loss and gradients against the same layer
  (same weights, no expert_axis) on one GPU: ||EP - single|| / ||single||
  for each tensor, the worst tensor reported (bf16, sums in another order).
- step time: wall clock per step over back-to-back steps (the whole step on
  every GPU; multi-GPU steps are several ms, far above dispatch cost).
- tokens/s per GPU = 4096 / step time.
- all-to-all: CUPTI durations of the NCCL kernels per step and GPU (they
  include waiting for the slowest peer), and their share of the GPU's kernel
  time. NCCL kernels can overlap compute kernels, so the kernel time may
  exceed the step time and the share is an upper bound.

    python3 benchmarks/ep_scaling.py      # JAX_MOE_BENCH_SMOKE=1 for CPU
    XLA_FLAGS=--xla_force_host_platform_device_count=4  (CPU smoke run)
"""
import statistics
import time

import common
from common import SMOKE, jax, np

import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

BF16, F32 = jnp.bfloat16, jnp.float32
AXIS = "expert"
LOCAL_EXPERTS = 32
SIZES = dict(hidden_size=7168, intermediate_size=2048)
BATCH_PER_GPU = (4, 1024)  # sequences, tokens per sequence
CAPACITY_FACTOR = 2.0
STEPS = 10
if SMOKE:
    SIZES = dict(hidden_size=128, intermediate_size=64)
    BATCH_PER_GPU, STEPS = (2, 64), 2


def make_layer(flax_mod, num_gpus, expert_axis):
    """The DeepSeek-V3-shaped layer for num_gpus GPUs; weights depend on the size alone."""
    from flax import nnx
    cfg = flax_mod.MoEConfig.deepseek_v3(
        num_experts=LOCAL_EXPERTS * num_gpus, num_shared_experts=0, dtype=BF16, param_dtype=BF16,
        expert_axis=expert_axis, capacity_factor=CAPACITY_FACTOR if expert_axis else None, **SIZES)
    layer = flax_mod.MoE(cfg, rngs=nnx.Rngs(0))
    layer.e_score_correction_bias[...] = 0.01 * jax.random.normal(jax.random.key(1), (cfg.num_experts,), F32)
    return layer


def step_fn(flax_mod, layer, mesh=None):
    """jit (state, x, cot) -> ((loss, (output, aux, dropped)), (d state, d x)), and the layer's state."""
    from flax import nnx
    graphdef, state = nnx.split(layer)

    def forward(state, x):
        out = nnx.merge(graphdef, state)(x)
        return out.output, out.aux_loss, out.stats["dropped_tokens"]

    if mesh is not None:
        forward = jax.shard_map(forward, mesh=mesh,
                                in_specs=(flax_mod.expert_partition_specs(state, AXIS), P(AXIS)),
                                out_specs=(P(AXIS), P(), P()))

    def loss(state, x, cot):
        out, aux, dropped = forward(state, x)
        return jnp.sum(out.astype(F32) * cot) + aux, (out, aux, dropped)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)), state


def place(flax_mod, state, mesh):
    specs = flax_mod.expert_partition_specs(state, AXIS)
    return jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def worst_rel_err(got, want):
    """max over tensors of ||got - want|| / ||want|| (Frobenius), computed on want's device.

    A norm, not a max: the router's float32 logits come from matmuls of another shape on one
    GPU, so a near-tie may pick another expert for a token, which moves that token's output and
    its gradients by O(1) while the norm barely changes.
    """
    worst = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if not jnp.issubdtype(w.dtype, jnp.floating):
            continue
        g = jax.device_put(g, list(w.devices())[0]).astype(F32)
        w = w.astype(F32)
        norm = float(jnp.linalg.norm(w.ravel())) or 1.0
        worst = max(worst, float(jnp.linalg.norm((g - w).ravel())) / norm)
    return worst


def time_steps(step, args):
    """(median wall ms per step, NCCL kernel ms per step and GPU, all kernel ms per step and GPU)."""
    jax.block_until_ready(step(*args))
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(STEPS):
            r = step(*args)
        jax.block_until_ready(r)
        walls.append((time.perf_counter() - t0) / STEPS * 1e3)
    nccl = total = None
    ext = common._cupti()
    if ext is not None:
        ext._cupti_init()
        try:
            for _ in range(STEPS):
                r = step(*args)
            jax.block_until_ready(r)
        finally:
            timings = ext._cupti_get_timings(False)
        gpus = len(args[1].devices())
        nccl = sum(ms for name, ms in timings if "nccl" in name.lower()) / STEPS / gpus
        total = sum(ms for _, ms in timings) / STEPS / gpus
    return statistics.median(walls), nccl, total


def run(flax_mod, num_gpus):
    devices = jax.devices()[:num_gpus]
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    batch = (BATCH_PER_GPU[0] * num_gpus, BATCH_PER_GPU[1])
    k_x, k_cot = jax.random.split(jax.random.key(num_gpus))
    x = jax.random.normal(k_x, (*batch, SIZES["hidden_size"]), BF16)
    cot = jax.random.normal(k_cot, x.shape, F32)

    single_step, single_state = step_fn(flax_mod, make_layer(flax_mod, num_gpus, None))
    (_, (want_out, want_aux, _)), want_grads = single_step(single_state, x, cot)
    want = (want_out, want_aux, want_grads)
    del single_state

    ep_step, ep_state = step_fn(flax_mod, make_layer(flax_mod, num_gpus, AXIS), mesh)
    ep_args = (place(flax_mod, ep_state, mesh), jax.device_put(x, NamedSharding(mesh, P(AXIS))),
               jax.device_put(cot, NamedSharding(mesh, P(AXIS))))
    (_, (out, aux, dropped)), grads = ep_step(*ep_args)
    err = worst_rel_err((out, aux, grads), want)
    del want, want_out, want_grads

    wall_ms, nccl_ms, kernel_ms = time_steps(ep_step, ep_args)
    tokens_per_gpu = BATCH_PER_GPU[0] * BATCH_PER_GPU[1]
    rec = dict(gpus=num_gpus, experts=LOCAL_EXPERTS * num_gpus, tokens=tokens_per_gpu * num_gpus,
               err=err, dropped=int(dropped), pairs=tokens_per_gpu * num_gpus * 8, wall_ms=wall_ms,
               tps_per_gpu=tokens_per_gpu / wall_ms * 1e3, nccl_ms=nccl_ms, kernel_ms=kernel_ms)
    print(rec, flush=True)
    return rec


def table(recs):
    base = recs[0]["tps_per_gpu"] if recs else None
    rows = [[r["gpus"], r["experts"], r["tokens"], r["wall_ms"], r["tps_per_gpu"],
             r["tps_per_gpu"] / base if base else None, r["nccl_ms"], r["kernel_ms"],
             100 * r["nccl_ms"] / r["kernel_ms"] if r["nccl_ms"] is not None and r["kernel_ms"] else None,
             f"{r['dropped']}/{r['pairs']}", f"{r['err']:.1e}"] for r in recs]
    return common.md_table(["GPUs", "experts", "tokens", "step ms", "tokens/s per GPU", "vs 1 GPU",
                            "all-to-all ms / GPU", "kernel ms / GPU", "all-to-all %", "dropped pairs",
                            "rel err vs 1 GPU"], rows)


def main():
    flax_mod = common.load_module("jax_moe.flax")
    if flax_mod is None:
        return
    counts = [d for d in (1, 2, 4, 8) if d <= len(jax.devices())]
    recs = [r for r in (common.try_call(f"ep {d} GPUs", run, flax_mod, d) for d in counts) if r]
    body = "\n".join([
        "Weak scaling of the expert-parallel layer (jit(value_and_grad), bf16): per GPU 32 experts, "
        "H=7168, I=2048, 4096 tokens, top-8 DeepSeek-V3 routing, sequence aux loss, capacity factor 2. "
        "Step time is wall clock; all-to-all is the NCCL kernels' CUPTI time per GPU (waiting for peers "
        "included); the error compares output, aux loss and every gradient with the same layer on one "
        "GPU (bf16).", "", table(recs)])
    common.publish("ep_scaling", "Expert parallelism: MoE layer on 1-8 GPUs (shard_map + all_to_all)", body)


if __name__ == "__main__":
    main()
