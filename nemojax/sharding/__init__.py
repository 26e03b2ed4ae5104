"""Meshes and sharding. `rules` (re-exported here): mesh axes, the one logical-axis rule table,
`constrain`, meshes and cache shardings, importing no model code. `placement`: variable shardings
(import it as `nemojax.sharding.placement`; it needs the model)."""

from nemojax.sharding.rules import (
    BATCH_AXES,
    CACHE_AXES,
    CONTEXT_PARALLEL_RULES,
    LOGICAL_RULES,
    MESH_AXES,
    batch_sharding,
    cache_axes,
    cache_shardings,
    constrain,
    context_mesh,
    head_units,
    logical_to_spec,
    make_mesh,
    parse_mesh,
    place,
    resolve_mesh_shape,
    sized_spec,
    use_mesh,
)

__all__ = ["BATCH_AXES", "CACHE_AXES", "CONTEXT_PARALLEL_RULES", "LOGICAL_RULES", "MESH_AXES", "batch_sharding",
           "cache_axes", "cache_shardings", "constrain", "context_mesh", "head_units", "logical_to_spec", "make_mesh",
           "parse_mesh", "place", "resolve_mesh_shape", "sized_spec", "use_mesh"]
