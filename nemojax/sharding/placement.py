"""Placing model variables on a mesh: a NamedSharding per variable from its logical axes and the
rule table (`nemojax.sharding.rules`), counted in whole heads and Mamba groups (`head_units`); on CPU
devices, one buffer for the blocks several devices hold (`share_host_replicas`).

Kept apart from the rules because it needs the model's parameter tree (the model imports the rules).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nemojax.config import ModelConfig
from nemojax.model import abstract_variables, logical_axes
from nemojax.sharding.rules import head_units, place, sized_spec


def variable_shardings(config: ModelConfig, mesh: Mesh) -> dict:
    """NamedShardings for every leaf of the model variables {"params", "buffers"}."""
    units = head_units(config)
    mesh_shape = dict(mesh.shape)

    def one(names: PartitionSpec, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        names = tuple(names) + (None,) * (len(leaf.shape) - len(names))
        dims = [units.get(n, d) if n is not None else d for n, d in zip(names, leaf.shape, strict=True)]
        return NamedSharding(mesh, sized_spec(names, dims, mesh_shape))

    return jax.tree.map(one, logical_axes(config), abstract_variables(config),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_variables(variables: dict, config: ModelConfig, mesh: Mesh) -> dict:
    """Model variables {"params", "buffers"} placed on `mesh` by `variable_shardings` (a model without MoE
    layers has no buffers: an empty "buffers" dict stays empty)."""
    shardings = variable_shardings(config, mesh)
    return {k: jax.tree.map(place, v, shardings.get(k, {})) for k, v in variables.items()}


def share_host_replicas(variables: Any) -> Any:
    """Read-only arrays whose identical blocks on several CPU devices share one buffer in memory.

    Host devices are threads of one process: a variable replicated over them would otherwise be held
    (and read from memory) once per device. Each distinct block is copied once, then handed to every
    device that holds it without a copy (the CPU client aliases an aligned host buffer). For arrays no
    program ever donates or writes in place (the serving engine's variables); other arrays are unchanged.
    """
    def share(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array) or any(d.platform != "cpu" for d in leaf.sharding.device_set):
            return leaf
        shards = leaf.addressable_shards
        blocks: dict[str, np.ndarray] = {}
        for shard in shards:
            key = repr(shard.index)
            if key not in blocks:
                blocks[key] = np.asarray(jnp.array(shard.data, copy=True))  # a view of a fresh, aligned buffer
        if len(blocks) == len(shards):
            return leaf
        parts = [jax.device_put(blocks[repr(shard.index)], shard.device) for shard in shards]
        return jax.make_array_from_single_device_arrays(leaf.shape, leaf.sharding, parts)

    return jax.tree.map(share, variables)
