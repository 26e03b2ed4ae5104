"""Dropless expert parallelism inside `jax.shard_map`, runnable on every backend (CPU included).

Each device on the mesh's "expert" axis holds E/ep experts. Tokens (and their routing) are
all-gathered over the expert axis, so every expert device sees the rows routed to its experts; it
runs only those rows through its local experts with the grouped matmul, and the partial outputs go
back to the devices that own the tokens with a reduce-scatter (psum_scatter) over the expert axis.
The expert intermediate dimension may also be split over "tensor" (partial sums, psum).

Dropless with static shapes: a token picks k distinct experts, so at most min(k, E/ep) of its copies
land on one device; each device's buffer holds that many rows per gathered token, which fits the
worst case exactly. (`jax.lax.ragged_all_to_all` would move fewer bytes on GPU but does not run on
CPU; this path is the one that is tested.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from nemojax.ops.expert_banks import Bank, as_bank, bank_matmul, bank_specs, num_experts, splits_features
from nemojax.sharding import context_mesh

TOKEN_AXES = ("data", "fsdp", "expert")


def uses_expert_parallelism(mesh: Mesh | AbstractMesh | None, num_experts: int) -> bool:
    """True when `mesh` has an expert axis larger than 1 that divides the number of experts."""
    ep = 1 if mesh is None or mesh.empty else dict(mesh.shape).get("expert", 1)
    return ep > 1 and num_experts % ep == 0


def _divisible_axes(candidates: tuple[str, ...], size: int, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    kept: tuple[str, ...] = ()
    for axis in candidates:
        n = mesh_shape.get(axis, 1)
        if n > 1 and size % (math.prod(mesh_shape[a] for a in kept) * n) == 0:
            kept += (axis,)
    return kept


def local_experts(x_md: jax.Array, local_ids_mk: jax.Array, weights_mk: jax.Array, up: Bank,
                  down: Bank, activation: Callable[[jax.Array], jax.Array], kernels: str = "auto") -> jax.Array:
    """sum over copies routed to this device's experts (ids in [0, E_local)); other ids contribute 0.
    `up` / `down` are expert banks (`nemojax.ops.expert_banks`) of the local experts; `kernels` chooses
    the NVFP4 matmul (`nemojax.ops.dispatch`), which runs on this device's rows.

    Returns [m, width] float32.
    """
    m, k = local_ids_mk.shape
    num_local = num_experts(up)
    is_local = (local_ids_mk >= 0) & (local_ids_mk < num_local)
    key = jnp.where(is_local, local_ids_mk, num_local).reshape(-1)
    rows = m * min(k, num_local)  # at most this many copies are local (a token's experts are distinct)
    order = jnp.argsort(key, stable=True)[:rows]
    group_sizes = jnp.bincount(key, length=num_local)
    # Rows past the local copies are not real: count them into the last group and zero them below.
    group_sizes = group_sizes.at[-1].add(rows - jnp.sum(group_sizes))
    real = key[order] < num_local
    token = order // k
    h = activation(bank_matmul(x_md[token], up, group_sizes, kernels=kernels, per_shard=True))
    y = bank_matmul(h, down, group_sizes, kernels=kernels, per_shard=True).astype(jnp.float32)
    y = jnp.where(real[:, None], y * weights_mk.reshape(-1)[order][:, None], 0.0)
    return jnp.zeros((m, y.shape[-1]), jnp.float32).at[token].add(y)


def expert_parallel_experts(x_td: jax.Array, ids_tk: jax.Array, weights_tk: jax.Array, up: Bank | jax.Array,
                            down: Bank | jax.Array, activation: Callable[[jax.Array], jax.Array],
                            mesh: Mesh | AbstractMesh | None = None, kernels: str = "auto") -> jax.Array:
    """Routed experts with experts spread over the mesh's "expert" axis; equals `dropless_experts`.
    `up` / `down`: expert banks of any storage format (a bare array is a float bank).

    Uses the context mesh (`nemojax.sharding.use_mesh`) by default. Returns [t, width] float32.
    """
    up, down = as_bank(up), as_bank(down)
    mesh = context_mesh() if mesh is None else mesh
    shape = dict(mesh.shape)
    t = x_td.shape[0]
    token_axes = _divisible_axes(TOKEN_AXES, t, shape)
    gathered = "expert" in token_axes
    parts = shape.get("tensor", 1)
    splits = parts > 1 and splits_features(up, "out", parts) and splits_features(down, "in", parts)
    tensor = "tensor" if splits else None
    rows = PartitionSpec(token_axes or None, None)

    def per_device(x, ids, weights, up, down):
        if gathered:
            x, ids, weights = (jax.lax.all_gather(a, "expert", tiled=True) for a in (x, ids, weights))
        else:
            # Explicitly varying: gathering rows of an expert-invariant x by expert-varying indices
            # otherwise gives wrong gradients for x (seen with jax 0.10.2).
            x, weights = jax.lax.pcast((x, weights), "expert", to="varying")
        first = jax.lax.axis_index("expert") * num_experts(up)
        y = local_experts(x, ids - first, weights, up, down, activation, kernels)
        if tensor:
            y = jax.lax.psum(y, tensor)
        if gathered:
            return jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
        return jax.lax.psum(y, "expert")

    return jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(rows, rows, rows, bank_specs(up, "expert", "out", tensor), bank_specs(down, "expert", "in", tensor)),
        out_specs=rows,
    )(x_td, ids_tk, weights_tk, up, down)
