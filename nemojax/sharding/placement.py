"""Placing model variables on a mesh: a NamedSharding per variable from its logical axes and the
rule table (`nemojax.sharding.rules`), counted in whole heads and Mamba groups (`head_units`).

Kept apart from the rules because it needs the model's parameter tree (the model imports the rules).
"""

from __future__ import annotations

import jax
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
