"""Logical axis names and the ONE table that maps them to mesh axes (data, fsdp, tensor, expert).

Every parameter is created with logical axis names (see `nemojax.model.layers`); activations are
constrained at layer boundaries with `constrain`. Without a mesh in context, `constrain` is a
no-op, so the model runs unchanged on one device.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axis (or a tuple of mesh axes, or None for replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mamba_proj", "tensor"),
    ("mamba_inner", "tensor"),
    ("mamba_heads", "tensor"),
    ("conv_dim", "tensor"),
    ("conv_kernel", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("expert_embed", "fsdp"),
    ("expert_mlp", "tensor"),
    ("latent", None),
    ("router_experts", None),
    ("mtp_concat", None),
    ("norm", None),
)


def logical_to_spec(logical_axes: Sequence[str | None], rules=LOGICAL_RULES,
                    mesh_axis_names: Sequence[str] = MESH_AXES) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec over the mesh axes present.

    A mesh axis is used at most once per tensor: a later logical axis that maps to an axis already
    taken stays replicated.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(a for a in targets if a in mesh_axis_names and a not in used)
        used.update(targets)
        out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*out)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding when a mesh is in context; identity otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, mesh_axis_names=mesh.axis_names))
