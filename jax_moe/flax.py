"""A Flax NNX Mixture-of-Experts layer on the jax_moe kernels.

`MoE(config, rngs=...)(x)` routes each token to k experts with `jax_moe.route` (or
`jax_moe.route_with_aux_loss`), runs the routed SwiGLU experts as permute -> grouped_matmul ->
unpermute, adds the optional shared experts, and returns `MoEOutput(output, aux_loss, stats)`.
`MoEConfig` holds the settings and has presets for DeepSeek-V3, Qwen3-MoE and Mixtral routing;
`aux_free_bias_update` is DeepSeek-V3's aux-loss-free balancing step. With `expert_axis` set, the
layer runs expert-parallel inside `jax.shard_map` (see `MoE._expert_parallel`).

Decisions, where neither the SPEC nor the issue fixes them:

* Parameter names and layouts follow MaxText / TransformerEngine so checkpoints map one to one:
  `gate_kernel` [H, E], `e_score_correction_bias` [E], `wi_0`, `wi_1` [E, H, I], `wo` [E, I, H],
  and `shared_experts.{wi_0, wi_1}` [H, S], `shared_experts.wo` [S, H] with
  S = num_shared_experts * intermediate_size (DeepSeek's convention for the shared width).
* Expert weights are plain `nnx.Param`s (optimizers and Linen's "params" collection take them as
  they are) tagged with the metadata `sharded_over_experts=True`, by which `expert_partition_specs`
  knows to split them over the expert axis. The correction bias is an `ExpertBias`, an
  `nnx.Variable` that is not a Param: `nnx.grad` and `nnx.Optimizer(..., wrt=nnx.Param)` leave it
  alone, and only `aux_free_bias_update` changes it. It is stored in `bias_dtype` and handed to
  `jax_moe.route` as is (the kernel reads it in its own dtype), never cast per step.
* The router runs in `router_dtype` (float32 by default, as TE and praxis do): logits are
  x·gate_kernel in that dtype; the experts run in `dtype`, with weights cast from `param_dtype`
  per call as Flax layers do.
* "Softmax top-k, renormalised" (Mixtral; Qwen3 with norm_topk_prob) is `route`'s softmax with
  use_pre_softmax=False: the softmax over the k chosen logits equals softmax over all E followed by
  renormalisation over the k chosen, and so do its gradients (exp(x_i)/Σ_k exp(x_j) does not depend
  on the logits that were not chosen).
* Aux loss: Switch/Megatron normalisation E·coeff/(k·T²)·Σ_e (Σ_t p[t, e])·count[e] (a perfectly
  balanced router gives `coeff`), with the counts taken from the top-k of the clean scores as SPEC §2
  and Megatron do. "batch" uses all tokens of the call (over `expert_axis` too); "sequence" is
  DeepSeek-V3's sequence-wise loss, the mean over sequences of the loss of each sequence (x must be
  [B, S, H]). With coeff 0 no aux loss is computed and 0.0 is returned.
* `stats["tokens_per_expert"]` counts the routing actually used (bias and groups included): it is the
  load that `aux_free_bias_update` balances and the demo reports.
* Expert parallelism uses `jax.lax.all_to_all` with a fixed capacity per pair of devices, not
  `ragged_all_to_all`: shapes stay static, and XLA:CPU has no ragged all-to-all, so the CPU-mesh
  tests could not run it. Tokens are split over the same mesh axis as the experts; the aux loss
  and the stats are reduced over that axis only (with further data-parallel axes, each expert
  group gets its own).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

import jax_moe

__all__ = ["ExpertBias", "MoE", "MoEConfig", "MoEOutput", "SwiGLU",
           "aux_free_bias_update", "expert_partition_specs", "linen_moe"]

_AUX_LOSS_TYPES = ("batch", "sequence")


class ExpertBias(nnx.Variable):
    """The router's correction bias: not a Param, so gradients and optimizers skip it."""


class MoEOutput(NamedTuple):
    """output [..., H] in `dtype`; aux_loss float32 scalar; stats: see `MoE.__call__`."""

    output: jax.Array
    aux_loss: jax.Array
    stats: dict


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Settings of an `MoE` layer. The routing fields are `jax_moe.route`'s keywords.

    Sizes: hidden_size H, intermediate_size I (per routed expert), num_experts E,
    num_experts_per_tok k, num_shared_experts (a shared SwiGLU of width num_shared_experts * I).
    Balancing: expert_bias adds `e_score_correction_bias`; bias_update_rate is the rate that
    `MoE.update_expert_bias` uses; aux_loss_coeff and aux_loss_type ("batch" or "sequence").
    Numerics: dtype (activations), param_dtype (weights), bias_dtype (the correction bias),
    router_dtype (gate logits). Parallelism: expert_axis (a mesh axis name: the layer must then run
    inside shard_map over it) and capacity_factor, used only with expert_axis (None: dropless, at
    the price of a receive buffer of D·T·k rows per device; else each device sends at most
    ceil(capacity_factor · T·k / D) token-expert pairs to each device, T local tokens, D devices).
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int = 0
    score_function: str = "softmax"
    use_pre_softmax: bool = False
    num_groups: int | None = None
    group_topk: int | None = None
    group_score_topn: int | None = None
    renormalize: bool | None = None
    scaling_factor: float = 1.0
    expert_bias: bool = False
    bias_update_rate: float = 0.0
    aux_loss_coeff: float = 0.0
    aux_loss_type: str = "batch"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bias_dtype: Any = jnp.float32
    router_dtype: Any = jnp.float32
    expert_axis: str | None = None
    capacity_factor: float | None = None

    def __post_init__(self):
        if self.aux_loss_type not in _AUX_LOSS_TYPES:
            raise ValueError(f"aux_loss_type must be one of {_AUX_LOSS_TYPES}, got {self.aux_loss_type!r}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                             f"got {self.num_experts_per_tok}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None (dropless), got {self.capacity_factor}")

    @classmethod
    def deepseek_v3(cls, **overrides) -> MoEConfig:
        """DeepSeek-V3: 256 experts, sigmoid scores, correction bias, 8 groups of which the 4 best
        (by the sum of their top-2 scores) stay eligible, top-8, renormalised, scaled by 2.5, one
        shared expert; bias update rate 0.001 and sequence-wise aux loss 0.0001 (the paper's γ, α)."""
        return cls(**{**dict(
            hidden_size=7168, intermediate_size=2048, num_experts=256, num_experts_per_tok=8,
            num_shared_experts=1, score_function="sigmoid", num_groups=8, group_topk=4,
            renormalize=True, scaling_factor=2.5, expert_bias=True, bias_update_rate=1e-3,
            aux_loss_coeff=1e-4, aux_loss_type="sequence"), **overrides})

    @classmethod
    def qwen3_moe(cls, **overrides) -> MoEConfig:
        """Qwen3-30B-A3B: 128 experts, softmax top-8 renormalised (norm_topk_prob), batch aux loss 0.001."""
        return cls(**{**dict(
            hidden_size=2048, intermediate_size=768, num_experts=128, num_experts_per_tok=8,
            score_function="softmax", aux_loss_coeff=1e-3, aux_loss_type="batch"), **overrides})

    @classmethod
    def mixtral(cls, **overrides) -> MoEConfig:
        """Mixtral 8x7B: 8 experts, softmax top-2 renormalised, batch aux loss 0.001 (HF's default)."""
        return cls(**{**dict(
            hidden_size=4096, intermediate_size=14336, num_experts=8, num_experts_per_tok=2,
            score_function="softmax", aux_loss_coeff=1e-3, aux_loss_type="batch"), **overrides})

    @property
    def route_kwargs(self) -> dict:
        """The keywords of jax_moe.route (without expert_bias) that this config sets."""
        return dict(score_function=self.score_function, use_pre_softmax=self.use_pre_softmax,
                    num_groups=self.num_groups, group_topk=self.group_topk,
                    group_score_topn=self.group_score_topn, renormalize=self.renormalize,
                    scaling_factor=self.scaling_factor)


def _expert_weights(rngs: nnx.Rngs, shape, dtype) -> nnx.Param:
    """[E, in, out] weights, fan-in scaled per expert; tagged for expert_partition_specs."""
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", batch_axis=(0,))
    return nnx.Param(init(rngs.params(), shape, dtype), sharded_over_experts=True)


def _is_expert_weight(variable) -> bool:
    return isinstance(variable, nnx.Param) and variable.get_metadata().get("sharded_over_experts", False)


class SwiGLU(nnx.Module):
    """A dense SwiGLU MLP: wo · (silu(x·wi_0) ⊙ x·wi_1); the shared experts of an MoE layer."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.dtype = dtype
        self.wi_0 = nnx.Param(init(rngs.params(), (hidden_size, intermediate_size), param_dtype))
        self.wi_1 = nnx.Param(init(rngs.params(), (hidden_size, intermediate_size), param_dtype))
        self.wo = nnx.Param(init(rngs.params(), (intermediate_size, hidden_size), param_dtype))

    def __call__(self, x):
        x = x.astype(self.dtype)
        h = jax.nn.silu(x @ self.wi_0[...].astype(self.dtype)) * (x @ self.wi_1[...].astype(self.dtype))
        return h @ self.wo[...].astype(self.dtype)


class MoE(nnx.Module):
    """Routed SwiGLU experts with a top-k router, optional shared experts and an aux loss."""

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        self.gate_kernel = nnx.Param(nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")(
            rngs.params(), (h, e), cfg.param_dtype))
        self.e_score_correction_bias = ExpertBias(jnp.zeros((e,), cfg.bias_dtype)) if cfg.expert_bias else None
        self.wi_0 = _expert_weights(rngs, (e, h, i), cfg.param_dtype)
        self.wi_1 = _expert_weights(rngs, (e, h, i), cfg.param_dtype)
        self.wo = _expert_weights(rngs, (e, i, h), cfg.param_dtype)
        self.shared_experts = (SwiGLU(h, cfg.num_shared_experts * i, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                      rngs=rngs) if cfg.num_shared_experts else None)

    def __call__(self, x) -> MoEOutput:
        """x [..., H] ([B, S, H] for the sequence-wise aux loss) -> MoEOutput(output, aux_loss, stats).

        stats: "tokens_per_expert" int32 [E], how many tokens the router chose each expert for
        (global over `expert_axis`, dropped pairs included); "dropped_tokens" int32 scalar, the
        token-expert pairs that found no room on their expert's device (always 0 without a
        capacity_factor), summed over `expert_axis`.
        """
        cfg = self.config
        if x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"x must have shape [..., hidden_size={cfg.hidden_size}], got {x.shape}")
        if cfg.aux_loss_coeff and cfg.aux_loss_type == "sequence" and x.ndim != 3:
            raise ValueError(f"the sequence-wise aux loss needs x of shape [B, S, H], got {x.shape}")
        tokens = x.reshape(-1, cfg.hidden_size)
        routing, aux_loss = self.route(tokens, batch_shape=x.shape[:-1])
        if cfg.expert_axis is None:
            routed, dropped = self.routed_experts(tokens, routing), jnp.zeros((), jnp.int32)
        else:
            routed, dropped = self._expert_parallel(tokens, routing)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(tokens)
        stats = dict(tokens_per_expert=jax_moe.tokens_per_expert(routing.indices, cfg.num_experts,
                                                                 axis_name=cfg.expert_axis),
                     dropped_tokens=dropped)
        return MoEOutput(routed.astype(cfg.dtype).reshape(x.shape), aux_loss, stats)

    def route(self, tokens, *, batch_shape=None):
        """tokens [T, H] -> (Routing, float32 aux loss). batch_shape: [B, S] for the sequence-wise loss."""
        cfg = self.config
        logits = tokens.astype(cfg.router_dtype) @ self.gate_kernel[...].astype(cfg.router_dtype)
        kwargs = dict(cfg.route_kwargs, expert_bias=self._bias())
        k = cfg.num_experts_per_tok
        if not cfg.aux_loss_coeff:
            return jax_moe.route(logits, k, **kwargs), jnp.zeros((), jnp.float32)
        if cfg.aux_loss_type == "batch":
            return jax_moe.route_with_aux_loss(logits, k, aux_coeff=cfg.aux_loss_coeff,
                                               axis_name=cfg.expert_axis, **kwargs)
        if batch_shape is None or len(batch_shape) != 2:
            raise ValueError(f"the sequence-wise aux loss needs batch_shape=(B, S), got {batch_shape}")
        return jax_moe.route(logits, k, **kwargs), self._sequence_aux_loss(logits, batch_shape)

    def routed_experts(self, tokens, routing):
        """tokens [T, H] and their Routing -> Σ_j weight_j · SwiGLU_{expert_j}(token), [T, H] in dtype."""
        x_sorted, group_sizes, sort_map = jax_moe.permute(tokens.astype(self.config.dtype), routing.indices,
                                                          self.wi_0.shape[0])
        y_sorted = self.expert_mlp(x_sorted, group_sizes)
        return jax_moe.unpermute(y_sorted, sort_map, routing.weights)

    def expert_mlp(self, x_sorted, group_sizes):
        """Rows grouped by expert [M, H] -> each row through its expert's SwiGLU, [M, H] in dtype."""
        dtype = self.config.dtype
        gate = jax_moe.grouped_matmul(x_sorted, self.wi_0[...].astype(dtype), group_sizes)
        up = jax_moe.grouped_matmul(x_sorted, self.wi_1[...].astype(dtype), group_sizes)
        hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(dtype)
        return jax_moe.grouped_matmul(hidden, self.wo[...].astype(dtype), group_sizes)

    def update_expert_bias(self, tokens_per_expert, rate: float | None = None) -> None:
        """Applies aux_free_bias_update to this layer's bias in place (rate: config.bias_update_rate)."""
        if self.e_score_correction_bias is None:
            raise ValueError("this MoE layer has no e_score_correction_bias (config.expert_bias is False)")
        rate = self.config.bias_update_rate if rate is None else rate
        self.e_score_correction_bias[...] = aux_free_bias_update(self.e_score_correction_bias[...],
                                                                 tokens_per_expert, rate)

    def _bias(self):
        return None if self.e_score_correction_bias is None else self.e_score_correction_bias[...]

    def _sequence_aux_loss(self, logits, batch_shape):
        """DeepSeek-V3's sequence-wise loss: the mean over sequences of each sequence's loss.

        SPEC §2's column layout: probs [S, B·E] (column b·E + e holds expert e's scores in sequence b)
        with per-sequence counts [B·E], T = S and coeff / B. Under expert parallelism each shard holds
        whole sequences, so the shards' losses (each divided by the global number of sequences) add up.
        """
        cfg = self.config
        e, k = cfg.num_experts, cfg.num_experts_per_tok
        num_seqs, seq_len = batch_shape
        scores_fn = functools.partial(jax_moe.aux_loss_scores, topk=k, score_function=cfg.score_function)
        scores, counts = jax.vmap(scores_fn)(logits.reshape(num_seqs, seq_len, e))
        probs = scores.transpose(1, 0, 2).reshape(seq_len, num_seqs * e)
        total_seqs = num_seqs * self._num_expert_shards()
        loss = jax_moe.aux_loss(probs, counts.reshape(-1), topk=k, coeff=cfg.aux_loss_coeff / total_seqs,
                                num_experts=e, total_num_tokens=seq_len)
        return loss if cfg.expert_axis is None else jax.lax.psum(loss, cfg.expert_axis)

    def _num_expert_shards(self) -> int:
        axis = self.config.expert_axis
        if axis is None:
            return 1
        try:
            return jax.lax.axis_size(axis)
        except NameError as e:
            raise ValueError(f"expert_axis {axis!r} is not bound: call an expert-parallel MoE inside "
                             f"jax.shard_map over that mesh axis") from e

    def _expert_parallel(self, tokens, routing):
        """Experts sharded over `expert_axis`; tokens travel there and back with all-to-alls.

        Runs inside shard_map over expert_axis (D devices), with this device's T tokens and its
        E/D experts (weights in_spec P(expert_axis), see expert_partition_specs); every other
        parameter is replicated. Each device fills a send buffer of D·C rows, C per destination:
        pair (t, j) takes the next free row of the device that owns its expert, in (t, j) order;
        once C rows are taken, later pairs for that device are dropped (they add nothing to the
        output and are counted). All-to-alls move the rows, their local expert ids and their
        routing weights to the owners, which run permute -> grouped_matmul -> unpermute on them:
        empty rows carry the out-of-range expert id E/D, so permute leaves them out of every
        group, and unpermute weighs each row by its routing weight. A last all-to-all brings the
        weighted rows back, where each token sums its k rows. C = T·k (no drop possible) without
        a capacity_factor, else ceil(capacity_factor · T·k / D): static shapes, one compilation.

        Returns (output [T, H], number of dropped pairs summed over the axis).
        """
        cfg = self.config
        axis, num_shards = cfg.expert_axis, self._num_expert_shards()
        local_experts = self.wi_0.shape[0]
        if local_experts * num_shards != cfg.num_experts:
            raise ValueError(f"expert weights hold {local_experts} experts per device on {num_shards} devices, "
                             f"expected num_experts={cfg.num_experts} split evenly: shard them over {axis!r}")
        num_tokens, k = routing.indices.shape
        capacity = _capacity(num_tokens * k, num_shards, cfg.capacity_factor)
        slot, kept = _send_slots(routing.indices.reshape(-1), local_experts, num_shards, capacity)

        def to_rows(values, empty):  # one value per pair -> one per send-buffer row
            return jnp.full((num_shards * capacity,), empty, values.dtype).at[slot].set(values, mode="drop")

        token_of_row = to_rows(jnp.arange(num_tokens * k, dtype=jnp.int32) // k, num_tokens)
        send = jnp.take(tokens.astype(cfg.dtype), token_of_row, axis=0, mode="fill", fill_value=0)
        expert_of_row = to_rows(routing.indices.reshape(-1) % local_experts, local_experts)
        weight_of_row = to_rows(routing.weights.reshape(-1), 0.0)

        all_to_all = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=0, concat_axis=0, tiled=True)
        received, received_experts, received_weights = map(all_to_all, (send, expert_of_row, weight_of_row))
        x_sorted, group_sizes, sort_map = jax_moe.permute(received, received_experts[:, None], local_experts)
        y_sorted = self.expert_mlp(x_sorted, group_sizes)
        weighted = jax_moe.unpermute(y_sorted, sort_map, received_weights[:, None])
        returned = all_to_all(weighted)

        pair_outputs = jnp.take(returned, slot, axis=0, mode="fill", fill_value=0).reshape(num_tokens, k, -1)
        output = pair_outputs.astype(jnp.float32).sum(axis=1)
        dropped = jax.lax.psum(jnp.sum(~kept, dtype=jnp.int32), axis)
        return output.astype(cfg.dtype), dropped


def _capacity(num_pairs: int, num_shards: int, capacity_factor: float | None) -> int:
    """Rows each device may send to each device (static)."""
    if capacity_factor is None:
        return max(num_pairs, 1)
    return max(1, min(num_pairs, math.ceil(capacity_factor * num_pairs / num_shards)))


def _send_slots(expert_of_pair, local_experts: int, num_shards: int, capacity: int):
    """Row of each pair in the [D·C] send buffer (D·C where dropped) and whether it was kept.

    A pair's rank among the earlier pairs bound for the same device is a running count over a
    one-hot [T·k, D] matrix: cheap for the few devices of an expert axis, and deterministic.
    """
    shard = expert_of_pair // local_experts
    running = jnp.cumsum(jax.nn.one_hot(shard, num_shards, dtype=jnp.int32), axis=0)
    rank = jnp.take_along_axis(running, shard[:, None], axis=1)[:, 0] - 1
    kept = rank < capacity
    return jnp.where(kept, shard * capacity + rank, num_shards * capacity), kept


def aux_free_bias_update(bias, tokens_per_expert, rate: float):
    """DeepSeek-V3's aux-loss-free balancing step: bias + rate · sign(mean load − load).

    Pure: returns the new bias (same shape and dtype; the step is taken in float32) and changes
    nothing. Overloaded experts get a lower bias and are picked less often; the bias only decides
    which experts are chosen, never the weights. Use the global counts of the step
    (`stats["tokens_per_expert"]`), and call it outside the gradient, after the optimizer step.
    """
    load = jnp.asarray(tokens_per_expert, jnp.float32)
    step = rate * jnp.sign(jnp.mean(load) - load)
    return (jnp.asarray(bias, jnp.float32) + step).astype(jnp.asarray(bias).dtype)


def expert_partition_specs(state, expert_axis: str):
    """PartitionSpecs for an nnx.State (or a Module): expert weights split over expert_axis, all else replicated.

    Use them as shard_map in_specs for the state of a model whose MoE layers have that expert_axis.
    """
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    return jax.tree.map(lambda v: PartitionSpec(expert_axis) if _is_expert_weight(v) else PartitionSpec(),
                        state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def linen_moe(config: MoEConfig, **kwargs):
    """The MoE layer as a Linen module (flax.nnx.bridge.to_linen): `linen_moe(cfg).init(key, x)`.

    Its weights live in the "params" collection and the correction bias in "ExpertBias" (pass
    mutable=["ExpertBias"] to update it from inside apply); calling it returns the same MoEOutput.
    """
    return nnx.bridge.to_linen(MoE, config, **kwargs)
