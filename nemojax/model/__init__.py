"""The Nemotron-H model (flax.linen) and helpers to create its variables."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.model.hybrid import NemotronH, init_cache

Variables = dict[str, Any]


def _abstract_boxed(config: ModelConfig) -> Variables:
    model = NemotronH(config)
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids))


def init_variables(config: ModelConfig, rng: jax.Array) -> Variables:
    """Random variables {"params", "buffers"} as plain arrays (no logical-axis boxes)."""
    model = NemotronH(config)
    variables = model.init(rng, jnp.zeros((1, 2), jnp.int32))
    variables = nn.meta.unbox(variables)
    return {k: v for k, v in variables.items() if k in ("params", "buffers")}


def abstract_variables(config: ModelConfig) -> Variables:
    """ShapeDtypeStructs of the variables, without allocating anything."""
    boxed = _abstract_boxed(config)
    return {k: nn.meta.unbox(v) for k, v in boxed.items() if k in ("params", "buffers")}


def logical_axes(config: ModelConfig) -> Variables:
    """The logical axis names of every variable (a PartitionSpec of names per leaf)."""
    boxed = _abstract_boxed(config)
    specs = nn.get_partition_spec(boxed)
    return {k: v for k, v in specs.items() if k in ("params", "buffers")}


__all__ = ["NemotronH", "init_cache", "init_variables", "abstract_variables", "logical_axes"]
