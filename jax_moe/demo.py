"""`python -m jax_moe.demo`: train a small MoE language model on generated text, on the CPU or a GPU.

The text comes from a few made-up "languages": each sequence starts with a language tag, then follows
that language's Markov chain, in which every word has `BRANCHING` possible successors. A model that
has learnt the chains and reads the tag predicts each next word with probability 1/BRANCHING, so
the best possible loss is known (printed with the results); a tiny model gets close within a few hundred
steps, which makes the falling loss easy to see.

The model is a decoder-only transformer whose feed-forward layers are `jax_moe.flax.MoE` layers, with
the routing of the chosen preset (DeepSeek-V3, Qwen3-MoE or Mixtral, scaled down). Training is plain
JAX: `jax.jit`, `jax.value_and_grad` and an optax AdamW, on functional nnx state; DeepSeek-V3's
correction bias is moved by `aux_free_bias_update` after each step, outside the gradient.
`--devices N` trains on an N-device mesh, data parallel and expert parallel over one axis: tokens
are split by sequence, experts by index, and the MoE layers exchange tokens with all-to-all.

    python -m jax_moe.demo                       # DeepSeek-V3 routing, about a minute on 2 CPU cores
    python -m jax_moe.demo --preset mixtral --steps 500 --plot moe.png
    python -m jax_moe.demo --devices 4 --capacity-factor 1.25
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jax_moe.flax import ExpertBias, MoE, MoEConfig, expert_partition_specs

AXIS = "devices"     # the one mesh axis: data and experts are both split over it
NUM_LANGUAGES = 4
BRANCHING = 2
VOCAB = 64           # the first NUM_LANGUAGES tokens are language tags, the rest words

# Per preset: (experts, intermediate size per expert); k, groups and scoring come from the preset.
PRESET_SIZES = {"deepseek_v3": (32, 16), "qwen3_moe": (32, 16), "mixtral": (8, 64)}
# Per --size: (d_model, layers, heads, seq_len, batch); intermediate sizes scale with d_model.
MODEL_SIZES = {"small": (64, 2, 4, 64, 16), "medium": (128, 4, 4, 128, 32), "large": (256, 6, 8, 256, 64)}


# ------------------------------------------------------------------------------------------- data
class Languages:
    """NUM_LANGUAGES random Markov chains over the words, each word with BRANCHING distinct successors."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        words = VOCAB - NUM_LANGUAGES
        successors = [[rng.choice(words, BRANCHING, replace=False) for _ in range(words)]
                      for _ in range(NUM_LANGUAGES)]
        self.successors = jnp.asarray(np.array(successors) + NUM_LANGUAGES, jnp.int32)  # [G, words, b]

    def sample(self, key, batch: int, seq_len: int):
        """int32 [batch, seq_len]: a tag, a uniformly random first word, then the tag's chain."""
        k_lang, k_first, k_steps = jax.random.split(key, 3)
        lang = jax.random.randint(k_lang, (batch,), 0, NUM_LANGUAGES)
        first = jax.random.randint(k_first, (batch,), NUM_LANGUAGES, VOCAB)
        choices = jax.random.randint(k_steps, (seq_len - 2, batch), 0, BRANCHING)

        def step(word, choice):
            nxt = self.successors[lang, word - NUM_LANGUAGES, choice]
            return nxt, nxt

        _, rest = jax.lax.scan(step, first, choices)
        return jnp.concatenate([lang[:, None], first[:, None], rest.T], axis=1).astype(jnp.int32)

    @staticmethod
    def loss_floor(seq_len: int) -> float:
        """The best mean next-token loss: the first word is uniform, every later one 1 of BRANCHING."""
        words = VOCAB - NUM_LANGUAGES
        return (math.log(words) + (seq_len - 2) * math.log(BRANCHING)) / (seq_len - 1)


# ------------------------------------------------------------------------------------------ model
class CausalSelfAttention(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = nnx.Linear(d_model, 3 * d_model, use_bias=False, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        b, s, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, s, 3 * self.num_heads, d // self.num_heads), 3, axis=2)
        return self.out(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, s, d))


class Block(nnx.Module):
    def __init__(self, moe: MoEConfig, num_heads: int, *, rngs: nnx.Rngs):
        d = moe.hidden_size
        self.attn_norm = nnx.RMSNorm(d, rngs=rngs)
        self.attn = CausalSelfAttention(d, num_heads, dtype=moe.dtype, rngs=rngs)
        self.moe_norm = nnx.RMSNorm(d, rngs=rngs)
        self.moe = MoE(moe, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x)).astype(x.dtype)
        out = self.moe(self.moe_norm(x))
        return x + out.output.astype(x.dtype), out.aux_loss, out.stats


class MoELanguageModel(nnx.Module):
    """Token and position embeddings, `layers` blocks of attention + MoE, tied output embedding."""

    def __init__(self, moe: MoEConfig, *, layers: int, num_heads: int, seq_len: int, rngs: nnx.Rngs):
        d = moe.hidden_size
        self.embed = nnx.Embed(VOCAB, d, rngs=rngs)
        self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, d)))
        self.blocks = nnx.List([Block(moe, num_heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(d, rngs=rngs)

    def __call__(self, tokens):
        """tokens [B, S] -> (logits float32 [B, S, VOCAB], summed aux loss, per-layer MoE stats)."""
        x = self.embed(tokens) + self.positions[: tokens.shape[1]]
        aux_total, stats = jnp.zeros((), jnp.float32), []
        for block in self.blocks:
            x, aux, layer_stats = block(x)
            aux_total, stats = aux_total + aux, stats + [layer_stats]
        return self.embed.attend(self.norm(x)).astype(jnp.float32), aux_total, stats


# --------------------------------------------------------------------------------------- training
def build_model(args, dtype) -> MoELanguageModel:
    d_model, layers, heads, seq_len, _ = MODEL_SIZES[args.size]
    experts, intermediate = PRESET_SIZES[args.preset]
    scale = d_model // MODEL_SIZES["small"][0]
    moe = getattr(MoEConfig, args.preset)(
        hidden_size=d_model, intermediate_size=intermediate * scale, num_experts=experts, dtype=dtype,
        expert_axis=AXIS if args.devices > 1 else None, capacity_factor=args.capacity_factor)
    return MoELanguageModel(moe, layers=layers, num_heads=heads, seq_len=seq_len, rngs=nnx.Rngs(args.seed))


def make_train_step(model: MoELanguageModel, optimizer, mesh, state_shardings=None):
    """A jitted (params, biases, opt_state, tokens) -> (params, biases, opt_state, metrics) step.

    With a mesh the forward runs inside shard_map: expert weights split over AXIS, every other
    parameter replicated, sequences split over AXIS; the MoE layers all-to-all between devices.
    The state keeps `state_shardings` (see place_on_mesh) from step to step.
    """
    graphdef, _, _ = nnx.split(model, nnx.Param, ExpertBias)

    def forward(params, biases, tokens):
        logits, aux, stats = nnx.merge(graphdef, params, biases)(tokens[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        total, count = nll.sum(), nll.size
        if mesh is not None:  # the mean over every device's sequences
            total, count = jax.lax.psum(total, AXIS), count * mesh.shape[AXIS]
        return total / count, aux, stats

    if mesh is not None:
        params_specs = expert_partition_specs(nnx.state(model, nnx.Param), AXIS)
        forward = jax.shard_map(forward, mesh=mesh, in_specs=(params_specs, P(), P(AXIS)), out_specs=P())

    def loss_fn(params, biases, tokens):
        ce, aux, stats = forward(params, biases, tokens)
        return ce + aux, (ce, aux, stats)

    def train_step(params, biases, opt_state, tokens):
        (loss, (ce, aux, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, biases, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        biases = _update_biases(graphdef, params, biases, stats)
        load = jnp.stack([s["tokens_per_expert"] for s in stats]).astype(jnp.float32)  # [layers, E]
        metrics = dict(loss=loss, ce=ce, aux=aux, load=load,
                       dropped=sum(s["dropped_tokens"] for s in stats))
        return params, biases, opt_state, metrics

    if mesh is None:
        return jax.jit(train_step)
    replicated = NamedSharding(mesh, P())
    return jax.jit(train_step, in_shardings=(*state_shardings, NamedSharding(mesh, P(AXIS))),
                   out_shardings=(*state_shardings, replicated))


def init_state(params, biases, optimizer, mesh):
    """(params, biases, opt_state) and, with a mesh, their shardings: expert weights and their optimizer
    moments split over AXIS, everything else replicated. Fixed shardings in and out of the step mean
    one compilation (a step left to choose its output shardings compiles again at step 2)."""
    if mesh is None:
        return (params, biases, optimizer.init(params)), None
    specs = expert_partition_specs(params, AXIS)
    params = jax.device_put(params, jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                                                 is_leaf=lambda x: isinstance(x, P)))
    state = (params, biases, optimizer.init(params))  # eager init: the moments follow the weights
    replicated = NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, state)
    return jax.device_put(state, shardings), shardings


def _update_biases(graphdef, params, biases, stats):
    """DeepSeek-V3's aux-loss-free step on every layer that has a correction bias."""
    model = nnx.merge(graphdef, params, biases)
    for block, layer_stats in zip(model.blocks, stats):
        if block.moe.e_score_correction_bias is not None:
            block.moe.update_expert_bias(layer_stats["tokens_per_expert"])
    return nnx.state(model, ExpertBias)


def make_mesh(num_devices: int):
    devices = jax.devices()
    if num_devices > len(devices):
        raise SystemExit(f"--devices {num_devices}: only {len(devices)} {jax.default_backend()} devices")
    return jax.make_mesh((num_devices,), (AXIS,), axis_types=(AxisType.Auto,), devices=devices[:num_devices])


def train(args) -> dict:
    """Builds the model, data and optimizer, then trains, printing as it goes; returns the history."""
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    _, _, _, seq_len, batch = MODEL_SIZES[args.size]
    batch = args.batch or batch
    if batch % args.devices:
        raise SystemExit(f"--batch {batch} must be a multiple of --devices {args.devices}")
    model = build_model(args, dtype)
    moe_cfg = model.blocks[0].moe.config
    if moe_cfg.num_experts % args.devices:
        raise SystemExit(f"--devices {args.devices} must divide the {moe_cfg.num_experts} experts")
    mesh = make_mesh(args.devices) if args.devices > 1 else None
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(50, args.steps // 10 + 1), args.steps,
                                                  end_value=args.lr / 10)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    _, params, biases = nnx.split(model, nnx.Param, ExpertBias)
    state, shardings = init_state(params, biases, optimizer, mesh)
    train_step = make_train_step(model, optimizer, mesh, shardings)
    data = Languages(args.seed)
    _print_setup(args, model, moe_cfg, dtype, batch, seq_len, data.loss_floor(seq_len))
    history = dict(loss=[], ce=[], aux=[], load=[], dropped=[], floor=data.loss_floor(seq_len))
    sample = jax.jit(functools.partial(data.sample, batch=batch, seq_len=seq_len))
    _training_loop(args, train_step, state, sample, batch * seq_len, history)
    _print_summary(history)
    return history


def _training_loop(args, train_step, state, sample, tokens_per_step, history):
    key = jax.random.key(args.seed)
    bar = _Progress(args.steps)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        key, data_key = jax.random.split(key)
        *state, metrics = train_step(*state, sample(data_key))
        metrics = jax.device_get(metrics)
        _record(history, metrics)
        if step == 1:  # compiling is not training: throughput is timed from here
            bar.write(f"compiled and ran step 1 in {time.perf_counter() - start:.1f} s")
            history["tokens_per_s"], window_start = None, time.perf_counter()
        else:
            history["tokens_per_s"] = (step - 1) * tokens_per_step / (time.perf_counter() - window_start)
        line = _metrics_line(step, args.steps, metrics, history["tokens_per_s"])
        bar.update(line, final=step % args.log_every == 0 or step == args.steps)
    bar.close()
    history["seconds"] = time.perf_counter() - start


def _record(history, metrics):
    for name in ("loss", "ce", "aux", "dropped"):
        history[name].append(float(metrics[name]))
    history["load"].append(np.asarray(metrics["load"]))


def _load_ratio(load) -> float:
    """max/mean expert load of the worst layer: 1.0 is perfect balance, E/k means one expert takes all."""
    load = np.asarray(load)
    return float(np.max(load.max(-1) / np.maximum(load.mean(-1), 1e-9)))


def _metrics_line(step, steps, metrics, tokens_per_s) -> str:
    line = f"step {step:>{len(str(steps))}}/{steps}  loss {metrics['ce']:.3f}  aux {metrics['aux']:.2e}  "
    line += f"{tokens_per_s:,.0f} tok/s  " if tokens_per_s else ""
    line += f"load max/mean {_load_ratio(metrics['load']):.2f}"
    return line + (f"  dropped {int(metrics['dropped'])}" if metrics["dropped"] else "")


def _print_setup(args, model, moe_cfg, dtype, batch, seq_len, floor):
    params = nnx.state(model, nnx.Param)
    total = sum(x.size for x in jax.tree.leaves(params))
    experts = sum(w.size for b in model.blocks for w in (b.moe.wi_0, b.moe.wi_1, b.moe.wo))
    active = total - experts + experts * moe_cfg.num_experts_per_tok // moe_cfg.num_experts
    devices = jax.devices()[: args.devices]
    print(f"jax_moe demo: {args.preset} routing ({moe_cfg.score_function}, top-{moe_cfg.num_experts_per_tok} of "
          f"{moe_cfg.num_experts} experts" + (f", {moe_cfg.num_groups} groups / top-{moe_cfg.group_topk}"
                                              if moe_cfg.num_groups else "")
          + (f", {moe_cfg.num_shared_experts} shared" if moe_cfg.num_shared_experts else "")
          + (", aux-loss-free bias" if moe_cfg.expert_bias else "")
          + f", {moe_cfg.aux_loss_type} aux loss {moe_cfg.aux_loss_coeff:g})")
    print(f"model: {args.size}, {len(model.blocks)} layers, d_model {moe_cfg.hidden_size}, {total / 1e6:.2f} M "
          f"parameters ({active / 1e6:.2f} M active), {jnp.dtype(dtype).name}")
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()})"
          + (f", expert parallel over {len(devices)}" if args.devices > 1 else ""))
    print(f"data: {NUM_LANGUAGES} generated languages, {VOCAB} tokens, batch {batch} x {seq_len} tokens; "
          f"best possible loss {floor:.3f}, uniform guess {math.log(VOCAB):.3f}", flush=True)


def _print_summary(history):
    print(f"done in {history['seconds']:.1f} s: loss {history['ce'][0]:.3f} -> {history['ce'][-1]:.3f} "
          f"(floor {history['floor']:.3f}), aux {history['aux'][-1]:.2e}, "
          f"load max/mean {_load_ratio(history['load'][-1]):.2f}, {history['tokens_per_s']:,.0f} tok/s"
          + (f", {int(sum(history['dropped']))} token-expert pairs dropped in all" if any(history["dropped"])
             else ""), flush=True)


class _Progress:
    """A tqdm bar whose text is the latest metrics line, or plain prints where tqdm is missing."""

    def __init__(self, total: int):
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, dynamic_ncols=True, leave=False)

    def write(self, line: str):
        if self.bar is None:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def update(self, line: str, *, final: bool):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_description_str(line, refresh=False)
        if final:
            self.write(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# -------------------------------------------------------------------------------------------- plot
def plot(history, path: str) -> None:
    """Loss (with its floor) and aux loss; max/mean load per layer; each expert's share of the last layer."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install matplotlib (or jax_moe[demo])", file=sys.stderr)
        return
    steps = np.arange(1, len(history["ce"]) + 1)
    load = np.stack(history["load"])  # [steps, layers, E]
    fig, (ax_loss, ax_ratio, ax_share) = plt.subplots(3, 1, figsize=(8, 10), sharex=True)
    ax_loss.plot(steps, history["ce"], label="loss (cross-entropy)")
    ax_loss.axhline(history["floor"], color="gray", linestyle="--", label="best possible")
    ax_loss.set_ylabel("loss")
    ax_aux = ax_loss.twinx()
    ax_aux.plot(steps, history["aux"], color="tab:orange", alpha=0.6, label="aux loss")
    ax_aux.set_ylabel("aux loss")
    ax_loss.legend(handles=ax_loss.lines + ax_aux.lines, loc="upper right")
    ratio = load.max(-1) / np.maximum(load.mean(-1), 1e-9)
    for layer in range(ratio.shape[1]):
        ax_ratio.plot(steps, ratio[:, layer], label=f"layer {layer}")
    ax_ratio.axhline(1.0, color="gray", linestyle="--")
    ax_ratio.set_ylabel("max / mean expert load")
    ax_ratio.legend(loc="upper right")
    share = load[:, -1] / np.maximum(load[:, -1].sum(-1, keepdims=True), 1)
    image = ax_share.imshow(share.T, aspect="auto", origin="lower", interpolation="nearest",
                            extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, share.shape[1] - 0.5))
    ax_share.set_ylabel("expert (last layer)")
    ax_share.set_xlabel("step")
    fig.colorbar(image, ax=ax_share, orientation="horizontal", pad=0.25, label="share of routed tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------- cli
def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jax_moe.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESET_SIZES), default="deepseek_v3", help="routing preset")
    parser.add_argument("--size", choices=list(MODEL_SIZES), default="small", help="model size")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the size's)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--devices", type=int, default=1,
                        help="devices of the data + expert parallel mesh (on the CPU, virtual devices)")
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="with --devices > 1: per-device capacity factor (default: dropless)")
    parser.add_argument("--log-every", type=int, default=25, help="print a metrics line every N steps")
    parser.add_argument("--plot", metavar="FILE.png", help="write a plot of loss and expert load")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 2 or args.devices < 1 or args.log_every < 1:
        parser.error("--steps must be >= 2, --devices and --log-every >= 1")
    return args


def use_cpu_devices(count: int) -> None:
    """Splits the CPU into `count` devices for --devices (GPUs are unaffected; a no-op when already split).

    jax is already imported (the jax_moe package imports it), so XLA_FLAGS would be read too late;
    jax_num_cpu_devices works as long as no backend has started yet.
    """
    if count <= 1 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already running (e.g. called from a program that used jax)
        pass


def main(argv=None) -> dict:
    args = parse_args(argv)
    use_cpu_devices(args.devices)
    history = train(args)
    if args.plot:
        plot(history, args.plot)
    return history


if __name__ == "__main__":
    main()
