"""Tests of jax_moe.flax: the MoE layer against a pure-JAX reference layer, its parameters, the
aux-loss-free bias update, and expert parallelism on a 4-device CPU mesh.

The reference layer (`reference_layer`) shares nothing with the module but its parameters: it routes
with jax_moe.reference.route, runs every expert on every token and mixes the results with dense
routing weights, so it checks routing, permutation and the grouped matmuls at once.
"""
import dataclasses
import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from jax_moe import reference
from jax_moe.flax import ExpertBias, MoE, MoEConfig, aux_free_bias_update, expert_partition_specs, linen_moe

F32, BF16 = jnp.float32, jnp.bfloat16
SMALL = dict(hidden_size=16, intermediate_size=8)
# Scaled-down presets with their routing intact; DeepSeek-V3 keeps 8 groups of 4 experts and top-4 groups.
PRESETS = {
    "deepseek_v3": MoEConfig.deepseek_v3(**SMALL, num_experts=32),
    "qwen3_moe": MoEConfig.qwen3_moe(**SMALL, num_experts=16),
    "mixtral": MoEConfig.mixtral(**SMALL),
}
BATCH, SEQ = 8, 8
AXIS = "expert"


def make_layer(config, seed=0, bias_scale=0.0):
  """A fresh MoE layer. Layers whose configs differ only in their parallel settings get the same
  parameters for the same seed (initialised once: initialisation compiles, which is slow on a CPU).
  bias_scale > 0 gives the correction bias random values so that it matters."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: MoE(config, rngs=nnx.Rngs(seed))))
  layer = nnx.merge(graphdef, _initial_state(dataclasses.replace(config, expert_axis=None, capacity_factor=None), seed))
  if layer.e_score_correction_bias is not None and bias_scale:
    bias = bias_scale * jax.random.normal(jax.random.key(seed + 1), (config.num_experts,))
    layer.e_score_correction_bias[...] = bias.astype(config.bias_dtype)
  return layer


@functools.cache
def _initial_state(config, seed):
  return nnx.state(MoE(config, rngs=nnx.Rngs(seed)))


def random_x(rng, config, shape=(BATCH, SEQ)):
  return jnp.asarray(rng.standard_normal((*shape, config.hidden_size)), config.dtype)


def reference_layer(layer, x):
  """(output, aux loss, tokens per expert) of `layer`'s parameters, computed without the jax_moe kernels."""
  cfg = layer.config
  e, k = cfg.num_experts, cfg.num_experts_per_tok
  tokens = x.reshape(-1, cfg.hidden_size).astype(F32)
  logits = tokens @ layer.gate_kernel[...]
  bias = None if layer.e_score_correction_bias is None else layer.e_score_correction_bias[...]
  weights, indices = reference.route(logits, k, expert_bias=bias, **cfg.route_kwargs)
  dense_weights = jnp.zeros((tokens.shape[0], e)).at[jnp.arange(tokens.shape[0])[:, None], indices].set(weights)
  gate = jnp.einsum("th,ehi->eti", tokens, layer.wi_0[...])
  up = jnp.einsum("th,ehi->eti", tokens, layer.wi_1[...])
  every_expert = jnp.einsum("eti,eih->eth", jax.nn.silu(gate) * up, layer.wo[...])
  out = jnp.einsum("te,eth->th", dense_weights, every_expert)
  if cfg.num_shared_experts:
    shared = layer.shared_experts
    out += (jax.nn.silu(tokens @ shared.wi_0[...]) * (tokens @ shared.wi_1[...])) @ shared.wo[...]
  return out.reshape(x.shape), reference_aux_loss(cfg, logits, x.shape[:-1]), reference.tokens_per_expert(indices, e)


def reference_aux_loss(cfg, logits, batch_shape):
  """The batch loss over all tokens, or the mean over sequences of each sequence's loss."""
  loss = functools.partial(reference_batch_aux_loss, cfg)
  if cfg.aux_loss_type == "batch":
    return loss(logits)
  return jnp.mean(jax.vmap(loss)(logits.reshape(*batch_shape, -1)))


def reference_batch_aux_loss(cfg, logits):
  scores, counts = reference.aux_loss_scores(logits, cfg.num_experts_per_tok, score_function=cfg.score_function)
  return reference.aux_loss(scores, counts, topk=cfg.num_experts_per_tok, coeff=cfg.aux_loss_coeff)


def module_fn(layer):
  """The layer's state and a pure (state, x) -> (output, aux loss, stats)."""
  graphdef, state = nnx.split(layer)
  return state, lambda state, x: tuple(nnx.merge(graphdef, state)(x))


def reference_fn(layer):
  graphdef, _ = nnx.split(layer)
  return lambda state, x: reference_layer(nnx.merge(graphdef, state), x)


def outputs_and_grads(fn, cot):
  """jit (state, x) -> ((d state, d x), (output, aux loss, stats)), the gradients of a scalar that
  depends on every output and, with a large weight, on the aux loss."""
  def loss(state, x):
    outputs = fn(state, x)
    return jnp.sum(outputs[0].astype(F32) * cot) + 1e3 * outputs[1], outputs
  return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def assert_trees_close(got, want, rtol):
  """Leaf by leaf: max |got - want| <= rtol · max |want|."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    scale = float(jnp.max(jnp.abs(w))) or 1.0
    err = float(jnp.max(jnp.abs(g.astype(F32) - w.astype(F32)))) / scale
    assert err <= rtol, f"{jax.tree_util.keystr(path)}: relative error {err:.2e} > {rtol:.0e}"


# ------------------------------------------------------------------------------------ parameters
@pytest.mark.parametrize("name", PRESETS)
def test_parameter_shapes_and_dtypes(name):
  cfg = dataclasses.replace(PRESETS[name], dtype=BF16, param_dtype=F32, bias_dtype=F32)
  layer = make_layer(cfg)
  h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
  params = {path: v[...] for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
  want = {("gate_kernel",): (h, e), ("wi_0",): (e, h, i), ("wi_1",): (e, h, i), ("wo",): (e, i, h)}
  if cfg.num_shared_experts:
    s = cfg.num_shared_experts * i
    want |= {("shared_experts", "wi_0"): (h, s), ("shared_experts", "wi_1"): (h, s),
             ("shared_experts", "wo"): (s, h)}
  assert {path: v.shape for path, v in params.items()} == want
  assert all(v.dtype == F32 for v in params.values())
  biases = jax.tree.leaves(nnx.state(layer, ExpertBias))
  assert [(b.shape, b.dtype) for b in biases] == ([((e,), F32)] if cfg.expert_bias else [])


def test_correction_bias_is_not_trained(rng):
  layer = make_layer(PRESETS["deepseek_v3"], bias_scale=0.1)
  x = random_x(rng, layer.config)
  grads = nnx.jit(nnx.grad(lambda m: m(x).output.sum() + m(x).aux_loss))(layer)
  assert "e_score_correction_bias" not in grads
  assert set(grads) >= {"gate_kernel", "wi_0", "wi_1", "wo"}


def test_bfloat16_layer_feeds_the_float32_bias_to_the_router_uncast():
  """bf16 activations, f32 bias: the bias goes straight into the routing kernel, converted nowhere."""
  cfg = dataclasses.replace(PRESETS["deepseek_v3"], dtype=BF16, router_dtype=BF16, bias_dtype=F32)
  graphdef, params, bias = nnx.split(make_layer(cfg), nnx.Param, ExpertBias)
  x = jnp.zeros((2, 4, cfg.hidden_size), BF16)
  compiled = jax.jit(lambda b, p, x: nnx.merge(graphdef, p, b)(x).output).lower(bias, params, x).compile()
  hlo = compiled.as_text()
  entry = hlo[hlo.index("\nENTRY"):]
  bias_param = re.search(r"(%\S+) = f32\[32\]\S* parameter\(0\)", entry).group(1)
  uses = [line for line in hlo.splitlines() if re.search(re.escape(bias_param) + r"[,)]", line)]
  assert any('custom_call_target="jax_moe_route' in line for line in uses), uses
  assert not any(" convert(" in line for line in uses), uses
  assert compiled(bias, params, x).dtype == BF16


# ------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("name", PRESETS)
def test_matches_reference(name, rng):
  """Output, aux loss, counts and the gradients of every parameter and of x."""
  layer = make_layer(PRESETS[name], bias_scale=0.05)
  x = random_x(rng, layer.config)
  cot = jnp.asarray(rng.standard_normal(x.shape), F32)
  state, fn = module_fn(layer)
  # GPUs default to TF32 for float32 matmuls: both sides must multiply in full float32 to agree.
  with jax.default_matmul_precision("highest"):
    grads, (out, aux, stats) = outputs_and_grads(fn, cot)(state, x)
    ref_grads, (ref_out, ref_aux, ref_counts) = outputs_and_grads(reference_fn(layer), cot)(state, x)
  np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(aux, ref_aux, rtol=1e-5)
  np.testing.assert_array_equal(stats["tokens_per_expert"], ref_counts)
  assert int(stats["dropped_tokens"]) == 0
  assert aux > 0 and stats["tokens_per_expert"].sum() == BATCH * SEQ * layer.config.num_experts_per_tok
  assert_trees_close(grads, ref_grads, rtol=1e-4)


def test_sequence_and_batch_aux_losses_differ_as_defined(rng):
  """One sequence: the two losses coincide; several unequal sequences: they do not."""
  cfg = PRESETS["deepseek_v3"]
  x = random_x(rng, cfg)
  seq_state, seq_fn = module_fn(make_layer(cfg))
  batch_state, batch_fn = module_fn(make_layer(dataclasses.replace(cfg, aux_loss_type="batch")))
  seq_aux = jax.jit(lambda x: (seq_fn(seq_state, x)[1], seq_fn(seq_state, x[:1])[1]))
  batch_aux = jax.jit(lambda x: (batch_fn(batch_state, x)[1], batch_fn(batch_state, x[:1])[1]))
  (seq_all, seq_one), (batch_all, batch_one) = seq_aux(x), batch_aux(x)
  np.testing.assert_allclose(seq_one, batch_one, rtol=1e-5)
  assert abs(float(seq_all) - float(batch_all)) > 1e-3 * float(batch_all)


def test_aux_loss_off_returns_zero(rng):
  layer = make_layer(dataclasses.replace(PRESETS["mixtral"], aux_loss_coeff=0.0))
  assert float(layer(random_x(rng, layer.config)).aux_loss) == 0.0


def test_linen_wrapper_matches_nnx(rng):
  cfg = PRESETS["deepseek_v3"]
  x = random_x(rng, cfg)
  module = linen_moe(cfg)
  variables = module.init(jax.random.key(0), x)
  assert set(variables) == {"params", "ExpertBias"}
  layer = make_layer(cfg, seed=1)  # other values, overwritten with the Linen ones below
  for path, value in flax.traverse_util.flatten_dict(flax.linen.meta.unbox(variables["params"])).items():
    functools.reduce(getattr, path, layer)[...] = value
  state, fn = module_fn(layer)
  np.testing.assert_allclose(jax.jit(module.apply)(variables, x).output, jax.jit(fn)(state, x)[0],
                             rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- balancing
def test_aux_free_bias_update_is_the_deepseek_rule():
  bias = jnp.array([0.5, -0.25, 0.0, 0.125], BF16)
  counts = jnp.array([10, 2, 4, 4], jnp.int32)  # mean 5
  new = aux_free_bias_update(bias, counts, 0.125)
  assert new.dtype == BF16 and new.shape == bias.shape
  np.testing.assert_array_equal(new.astype(F32), [0.375, -0.125, 0.125, 0.25])
  np.testing.assert_array_equal(bias.astype(F32), [0.5, -0.25, 0.0, 0.125])  # pure: input untouched


def test_bias_updates_balance_a_skewed_router(rng):
  """Sigmoid routing with a gate that favours two experts: repeated updates of the module's bias state
  even the load out."""
  cfg = MoEConfig.deepseek_v3(**SMALL, num_experts=16, num_groups=None, group_topk=None,
                              num_experts_per_tok=2, aux_loss_coeff=0.0)
  layer = make_layer(cfg)
  layer.gate_kernel[...] = layer.gate_kernel[...].at[:, :2].add(3.0)
  graphdef, params, bias_state = nnx.split(layer, nnx.Param, ExpertBias)
  x = random_x(rng, cfg, shape=(512,))
  load = jax.jit(lambda b: nnx.merge(graphdef, params, b)(x).stats["tokens_per_expert"])

  def imbalance(b):
    return float(load(b).max() / load(b).mean())

  before = imbalance(bias_state)
  for _ in range(200):
    bias_state = jax.tree.map(functools.partial(aux_free_bias_update, tokens_per_expert=load(bias_state), rate=5e-3),
                              bias_state)
  assert before > 3.0 and imbalance(bias_state) < 1.4, (before, imbalance(bias_state))


# ------------------------------------------------------------------------------- errors
def test_bad_inputs_raise(rng):
  layer = make_layer(PRESETS["deepseek_v3"])
  with pytest.raises(ValueError, match="hidden_size"):
    layer(jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match=r"\[B, S, H\]"):
    layer(jnp.zeros((4, 16)))
  with pytest.raises(ValueError, match="aux_loss_type"):
    dataclasses.replace(PRESETS["mixtral"], aux_loss_type="token")
  with pytest.raises(ValueError, match="capacity_factor"):
    dataclasses.replace(PRESETS["mixtral"], capacity_factor=0.0)
  with pytest.raises(ValueError, match="no e_score_correction_bias"):
    make_layer(PRESETS["mixtral"]).update_expert_bias(jnp.ones(8))


def test_expert_axis_outside_shard_map_raises(rng):
  layer = make_layer(dataclasses.replace(PRESETS["mixtral"], expert_axis=AXIS))
  with pytest.raises(ValueError, match="shard_map"):
    layer(random_x(rng, layer.config))


# ------------------------------------------------------------------------- expert parallelism
def mesh4():
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices")
  return jax.make_mesh((4,), (AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])


def expert_parallel_fn(layer, mesh):
  """(state, x) -> (output, aux loss, stats) of a layer with expert_axis=AXIS, run under shard_map."""
  state, fn = module_fn(layer)
  sharded = jax.shard_map(fn, mesh=mesh, in_specs=(expert_partition_specs(state, AXIS), P(AXIS)),
                          out_specs=(P(AXIS), P(), P()))
  return state, sharded


@pytest.mark.parametrize("name", PRESETS)
def test_expert_parallel_equals_single_device(name, rng):
  """Dropless EP on 4 devices: output, aux loss, counts and every gradient as on one device."""
  cfg = PRESETS[name]
  state, fn = module_fn(make_layer(cfg, bias_scale=0.05))
  ep_state, ep_fn = expert_parallel_fn(make_layer(dataclasses.replace(cfg, expert_axis=AXIS), bias_scale=0.05),
                                       mesh4())
  x = random_x(rng, cfg)
  cot = jnp.asarray(rng.standard_normal(x.shape), F32)
  ep_result = outputs_and_grads(ep_fn, cot)(ep_state, x)
  assert_trees_close(ep_result, outputs_and_grads(fn, cot)(state, x), rtol=1e-4)


def expected_kept(indices, num_shards, local_experts, capacity):
  """bool [T, k]: on each device (its T/D tokens), the first `capacity` pairs for each destination in (t, j) order."""
  tokens, k = indices.shape
  kept = np.zeros(indices.shape, bool)
  for shard in range(num_shards):
    taken = np.zeros(num_shards, int)
    for t in range(shard * tokens // num_shards, (shard + 1) * tokens // num_shards):
      for j in range(k):
        dest = indices[t, j] // local_experts
        kept[t, j] = taken[dest] < capacity
        taken[dest] += 1
  return kept


def test_expert_parallel_drops_over_capacity_and_counts(rng):
  """capacity_factor 0.5: the pairs past capacity are dropped, counted, and missing from the output."""
  cfg = dataclasses.replace(PRESETS["mixtral"], capacity_factor=0.5)
  single = make_layer(cfg)
  ep_state, ep_fn = expert_parallel_fn(make_layer(dataclasses.replace(cfg, expert_axis=AXIS)), mesh4())
  x = random_x(rng, cfg)
  out, _, stats = jax.jit(ep_fn)(ep_state, x)

  tokens = x.reshape(-1, cfg.hidden_size)
  routing, _ = single.route(tokens)
  pairs_per_shard = tokens.shape[0] // 4 * cfg.num_experts_per_tok
  kept = expected_kept(np.asarray(routing.indices), 4, cfg.num_experts // 4,
                       capacity=int(np.ceil(0.5 * pairs_per_shard / 4)))
  assert int(stats["dropped_tokens"]) == int((~kept).sum()) > 0
  surviving = routing._replace(weights=jnp.where(kept, routing.weights, 0.0))
  np.testing.assert_allclose(out.reshape(tokens.shape), single.routed_experts(tokens, surviving),
                             rtol=1e-5, atol=1e-6)
