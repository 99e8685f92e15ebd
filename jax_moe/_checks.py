"""Argument checks shared by the op modules: each raises before anything runs, naming the argument."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np

SCORE_FUNCTIONS = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}  # values of ScoreFunction in moe_math.h
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def static_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a static Python int, got {type(value).__name__}")
    return operator.index(value)


def static_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a static Python number, got {type(value).__name__}")
    return float(value)


def float_array(x, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    return x


def topk_in_range(topk, num_experts: int, name: str = "topk") -> int:
    topk = static_int(topk, name)
    if not 1 <= topk <= num_experts:
        raise ValueError(f"{name} must be in [1, num_experts={num_experts}], got {topk}")
    return topk


def score_function(value, name: str = "score_function") -> int:
    if not isinstance(value, str) or value not in SCORE_FUNCTIONS:
        raise ValueError(f"{name} must be one of {sorted(SCORE_FUNCTIONS)}, got {value!r}")
    return SCORE_FUNCTIONS[value]


def axis_names(axis_name) -> tuple:
    if axis_name is None:
        return ()
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names or not all(isinstance(a, str) for a in names):
        raise TypeError(f"axis_name must be a mesh axis name or a tuple of them, got {axis_name!r}")
    return names


def axes_size(axes) -> int:
    """The product of the axes' sizes; a clear error outside shard_map."""
    size = 1
    for a in axes:
        try:
            size *= jax.lax.axis_size(a)
        except NameError as e:
            raise ValueError(f"axis_name {a!r} is not bound here: use it inside shard_map over that axis") from e
    return size


def total_tokens(total_num_tokens, local_tokens: int, axes) -> int:
    """T of the aux loss: total_num_tokens if given, else the token count summed over `axes`."""
    size = axes_size(axes)
    if total_num_tokens is None:
        return local_tokens * size
    total = static_int(total_num_tokens, "total_num_tokens")
    if total < 0:
        raise ValueError(f"total_num_tokens must be >= 0, got {total}")
    return total
