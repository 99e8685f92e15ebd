"""Loads the compiled kernels and turns each one into a JAX primitive.

`kernel_primitive` is the one helper every op module uses: it gives a kernel an abstract
evaluation, a lowering to the XLA FFI on CPU and CUDA, a batching rule and (optionally) a
sharding rule, so the op composes with jit, grad, vmap and shard_map.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax._src import dispatch
from jax.experimental.custom_partitioning import SdyShardingRule, custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir, xla
from jax.sharding import NamedSharding, PartitionSpec

from . import _jax_moe_cpu

try:  # The CUDA extension exists only where the package was built with nvcc.
    from . import _jax_moe_cuda
except ImportError:
    _jax_moe_cuda = None

_REBUILD_HINT = (
    "rebuild jax_moe against the installed jaxlib: "
    "pip install --no-build-isolation --force-reinstall --no-deps ."
)


def _runtime_ffi_api_version() -> tuple[int, int] | None:
    """The FFI API version of the running jaxlib, read from the headers it ships."""
    header = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h"
    try:
        text = header.read_text()
    except OSError:
        return None
    found = dict(re.findall(r"#define XLA_FFI_API_(MAJOR|MINOR) (\d+)", text))
    if len(found) != 2:
        return None
    return int(found["MAJOR"]), int(found["MINOR"])


def _check_ffi_version(ext) -> None:
    built = tuple(ext.ffi_api_version())
    runtime = _runtime_ffi_api_version()
    # XLA accepts handlers built against its own FFI API version or an older one.
    if runtime is not None and built > runtime:
        raise ImportError(
            f"{ext.__name__} was built against XLA FFI API {built[0]}.{built[1]}, but the running "
            f"jaxlib {jax.lib.__version__} supports only up to {runtime[0]}.{runtime[1]}; {_REBUILD_HINT}"
        )


def _register(ext, platform: str) -> None:
    _check_ffi_version(ext)
    for name, capsule in ext.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform=platform)


_register(_jax_moe_cpu, "cpu")
if _jax_moe_cuda is not None:
    _register(_jax_moe_cuda, "CUDA")


def available_platforms() -> tuple[str, ...]:
    """Platforms that have compiled jax_moe kernels."""
    return ("cpu", "cuda") if _jax_moe_cuda is not None else ("cpu",)


# ------------------------------------------------------------------ sharding
class TokenParallel:
    """Sharding of a kernel that treats all leading dimensions as independent tokens.

    Operands and results are [..., X]: their leading dimensions are shared factors that may be
    sharded (each shard runs the kernel on its tokens), while every last dimension stays whole.
    Operands listed in `replicated` (e.g. an expert bias) are replicated. Results listed in
    `reduced` are sums over tokens: each shard computes its partial result and
    `combine(results, axis_names, params)` (default: psum of each reduced result over the token
    axes; params: the kernel's) turns the partials into the global, replicated value, so no
    operand is ever gathered.
    Results listed in `scratch` are workspaces whose shape does not depend on the token count:
    each shard keeps its own, and nobody reads them.
    """

    def __init__(self, replicated: Sequence[int] = (), reduced: Sequence[int] = (),
                 combine: Callable | None = None, scratch: Sequence[int] = ()):
        self.replicated = frozenset(replicated)
        self.reduced = frozenset(reduced)
        self.combine = combine or self._psum_reduced
        self.scratch = frozenset(scratch)

    def _psum_reduced(self, results, axes, params):
        return [jax.lax.psum(r, axes) if i in self.reduced else r for i, r in enumerate(results)]

    def rule(self, operand_ranks, result_ranks) -> SdyShardingRule:
        lead = max(operand_ranks[i] for i in range(len(operand_ranks)) if i not in self.replicated) - 1
        tokens = tuple(f"t{d}" for d in range(lead))
        whole: list[str] = []

        def mapping(rank, own_factors):
            names = [f"w{len(whole) + d}" for d in range(rank if own_factors else 1)]
            whole.extend(names)
            return names if own_factors else (*tokens, *names)

        operands = tuple(tuple(mapping(r, i in self.replicated)) for i, r in enumerate(operand_ranks))
        results = tuple(tuple(mapping(r, i in self.reduced or i in self.scratch))
                        for i, r in enumerate(result_ranks))
        return SdyShardingRule(operands, results, need_replication_factors=tuple(whole))

    def partition(self, mesh, arg_shapes, result_shapes, run, params):
        """(per-shard function, argument shardings, result shardings) for the given inputs."""
        first = next(i for i in range(len(arg_shapes)) if i not in self.replicated)
        lead = arg_shapes[first].ndim - 1
        tokens = (tuple(arg_shapes[first].sharding.spec) + (None,) * lead)[:lead]
        axes = tuple(a for entry in tokens if entry is not None
                     for a in (entry if isinstance(entry, tuple) else (entry,)))
        replicated = NamedSharding(mesh, PartitionSpec())
        token_sharding = NamedSharding(mesh, PartitionSpec(*tokens, None))
        args = [replicated if i in self.replicated else token_sharding for i in range(len(arg_shapes))]
        results = [replicated if i in self.reduced or i in self.scratch else token_sharding
                   for i in range(len(result_shapes))]
        if self.reduced and axes:
            def per_shard(*a):
                return tuple(self.combine(list(run(*a)), axes, params))
        else:
            per_shard = run
        return per_shard, args, results


class TokensFromResults:
    """Sharding of a kernel whose results [tokens, ...] come from replicated operands only (e.g. a
    backward that writes one row on every token), with the token count in its static parameter `param`.

    No operand has the token dimension, so the Shardy rule gives it to the results alone: XLA's
    propagation shards it as the results' users want it (e.g. the other operand of an elementwise op,
    or the jit's out_shardings), and each shard binds the kernel with its own token count, writing
    only its rows. With nothing to follow, the results stay replicated (every device writes them all).
    """

    def __init__(self, param: str):
        self.param = param

    def rule(self, operand_ranks, result_ranks) -> SdyShardingRule:
        operands = tuple(tuple(f"o{i}_{d}" for d in range(r)) for i, r in enumerate(operand_ranks))
        results = tuple(("t", *(f"r{i}_{d}" for d in range(1, r))) for i, r in enumerate(result_ranks))
        whole = tuple(f for factors in operands + results for f in factors if f != "t")
        return SdyShardingRule(operands, results, need_replication_factors=whole)

    def partition(self, mesh, arg_shapes, result_shapes, run, params):
        """(per-shard function, argument shardings, result shardings) for the results' token sharding."""
        tokens = (tuple(result_shapes[0].sharding.spec) + (None,))[0]
        axes = tokens if isinstance(tokens, tuple) else () if tokens is None else (tokens,)
        shards = math.prod(mesh.shape[a] for a in axes)
        local = -(-result_shapes[0].shape[0] // shards)  # XLA pads uneven shards
        results = [NamedSharding(mesh, PartitionSpec(tokens, *(None,) * (r.ndim - 1))) for r in result_shapes]

        def per_shard(*args):
            return run(*args, **{self.param: local})

        return per_shard, [NamedSharding(mesh, PartitionSpec())] * len(arg_shapes), results


# ---------------------------------------------------------------- primitives
def _attributes(params: dict) -> dict:
    # Python floats would become f64 attributes; the handlers decode float32.
    return {k: np.float32(v) if isinstance(v, float) else v for k, v in params.items()}


def _no_cuda_kernels(ctx, *args, **params):
    raise RuntimeError(
        "jax_moe has no CUDA kernels: it was built without a CUDA compiler. "
        "Install nvcc and reinstall: pip install --no-build-isolation --force-reinstall --no-deps ."
    )


def _local_primitive(target: str, abstract_eval: Callable, shape_params: frozenset) -> Primitive:
    """The FFI call itself, on whatever (local) shapes it is given."""
    prim = Primitive(f"{target}_local")
    prim.multiple_results = True
    prim.def_impl(functools.partial(xla.apply_primitive, prim))
    prim.def_abstract_eval(abstract_eval)
    ffi_rule = jax.ffi.ffi_lowering(target)

    def lowering(ctx, *args, **params):
        attributes = {k: v for k, v in params.items() if k not in shape_params}
        return ffi_rule(ctx, *args, **_attributes(attributes))

    mlir.register_lowering(prim, lowering, platform="cpu")
    mlir.register_lowering(prim, lowering if _jax_moe_cuda else _no_cuda_kernels, platform="cuda")
    return prim


def _ranks(types) -> list[int]:
    return [mlir.ir.ShapedType(t).rank for t in types]


def _bind_fn(local: Primitive, kwargs: dict):
    def run(*args, **per_shard):  # per_shard: parameters that differ on a shard (TokensFromResults)
        return tuple(local.bind(*args, **{**kwargs, **per_shard}))

    return run


@functools.lru_cache(maxsize=None)
def _partitioned_call(local: Primitive, sharding, params: tuple):
    """The local kernel wrapped so XLA's partitioner runs it per shard, per `sharding`."""
    run = _bind_fn(local, dict(params))
    call = custom_partitioning(run)

    def partition(mesh, arg_shapes, result_shape):
        results = result_shape if isinstance(result_shape, (list, tuple)) else (result_shape,)
        per_shard, arg_shardings, result_shardings = sharding.partition(mesh, arg_shapes, results, run,
                                                                        dict(params))
        return mesh, per_shard, tuple(result_shardings), tuple(arg_shardings)

    def rule(mesh, operand_types, result_types):
        return sharding.rule(_ranks(operand_types), _ranks(result_types))

    call.def_partition(partition=partition, sharding_rule=rule)
    return call


def _spans_devices(ctx) -> bool:
    """Whether this computation is partitioned over several devices (else no partitioner runs)."""
    context = ctx.module_context.axis_context
    devices = getattr(context, "device_assignment", None)
    if devices is None and hasattr(context, "mesh"):  # inside shard_map
        return context.mesh.size > 1
    return devices is not None and len(devices) > 1


def kernel_primitive(
    target: str,
    abstract_eval: Callable,
    batch_rule: Callable,
    sharding: TokenParallel | TokensFromResults | None = None,
    shape_params: Sequence[str] = (),
) -> Primitive:
    """A primitive for the FFI target `target` (registered for CPU and, if built, CUDA).

    abstract_eval(*avals, **params) -> output avals; batch_rule(prim, args, dims, **params) is a
    vmap rule that must handle every batch dimension; `sharding` (optional) lets the kernel run
    per shard under jit with sharded inputs instead of gathering them. Parameters named in
    `shape_params` only shape the outputs (for abstract_eval): they are not passed to the kernel,
    which reads them from its output buffers.
    """
    local = _local_primitive(target, abstract_eval, frozenset(shape_params))
    prim = Primitive(target)
    prim.multiple_results = True
    prim.def_impl(functools.partial(xla.apply_primitive, prim))
    prim.def_abstract_eval(abstract_eval)
    batching.primitive_batchers[prim] = functools.partial(batch_rule, prim)

    def lowering(ctx, *args, **params):
        if sharding is None or not _spans_devices(ctx):
            run = _bind_fn(local, params)
        else:
            run = _partitioned_call(local, sharding, tuple(sorted(params.items())))
        return mlir.lower_fun(run, multiple_results=True)(ctx, *args)

    mlir.register_lowering(prim, lowering)
    if sharding is not None:
        # custom_partitioning needs the device assignment while lowering, which jit withholds
        # unless the primitive is listed here (as jax's own cuDNN primitives are).
        dispatch.prim_requires_devices_during_lowering.add(prim)
    return prim


# ----------------------------------------------------------- abstract values
# Output avals are derived from an input aval with `update`, so that they keep its sharding and the
# manual (shard_map) axes it varies over; a fresh ShapedArray would drop both.
def token_aval(x, last: int, dtype):
    """[..., last] with x's leading (token) dims and their sharding; the last dim is whole."""
    spec = tuple(x.sharding.spec) + (None,) * x.ndim
    return x.update(shape=(*x.shape[:-1], last), dtype=dtype,
                    sharding=x.sharding.update(spec=PartitionSpec(*spec[: x.ndim - 1], None)))


def derived_aval(x, shape, dtype):
    """An output computed from x (and operands varying like it): replicated, varying where x varies."""
    return x.update(shape=shape, dtype=dtype, sharding=x.sharding.update(spec=PartitionSpec()))


def match_manual_axes(*xs):
    """Inside shard_map, makes every operand vary over the union of the manual axes any of them
    varies over, as JAX's own primitives require. Autodiff then psums the cotangent of an operand
    that was replicated (pcast's transpose), so its gradient comes back replicated and correct."""
    vmas = [getattr(jax.typeof(x), "vma", frozenset()) for x in xs]
    union = frozenset().union(*vmas)
    return tuple(jax.lax.pcast(x, tuple(sorted(union - v)), to="varying") if union - v else x
                 for x, v in zip(xs, vmas))


def reduced_aval(x, shape, dtype):
    """A per-call reduction over x's tokens: replicated, varying where x varies."""
    return x.update(shape=shape, dtype=dtype, sharding=x.sharding.update(spec=PartitionSpec()))


# ------------------------------------------------------------------ batching
def move_batch_to_front(args, dims, size):
    """Each argument with its batch dimension first (broadcast where unbatched)."""
    out = []
    for a, d in zip(args, dims):
        if d is None:
            out.append(jax.numpy.broadcast_to(a, (size, *a.shape)))
        else:
            out.append(jax.numpy.moveaxis(a, d, 0))
    return out


def batch_size(args, dims) -> int:
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def batch_as_tokens(prim, args, dims, **params):
    """vmap rule of a per-token kernel: leading dims are tokens to it, so the batch is more tokens."""
    return prim.bind(*move_batch_to_front(args, dims, batch_size(args, dims)), **params), (0,)


def batch_per_call(prim, args, dims, **params):
    """vmap rule of a kernel whose outputs reduce over all of its tokens: one call per batch element."""
    args = move_batch_to_front(args, dims, batch_size(args, dims))
    outs = jax.lax.map(lambda a: tuple(prim.bind(*a, **params)), tuple(args))
    return list(outs), (0,) * len(outs)
