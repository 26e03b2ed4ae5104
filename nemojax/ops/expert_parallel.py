"""Expert parallelism inside `jax.shard_map`, runnable on every backend (CPU included).

Each device on the mesh's "expert" axis holds E/ep experts. Tokens (the latent rows, their expert
ids and weights) are all-gathered over the expert axis; each device sorts the copies routed to its
own experts to the front of a static buffer and multiplies only those: the group sizes handed to
the grouped matmul count its routed rows and nothing else, so the rows past their sum (padding, and
copies routed elsewhere) are skipped by kernels that honour group sizes (the Pallas grouped kernel,
XLA's grouped-GEMM lowerings of `ragged_dot`) and come back as zeros. Partial outputs go back to
the devices that own the tokens with a reduce-scatter (float32). The expert intermediate dimension
may also be split over "tensor" (partial sums, psum).

Why an all-gather and not `jax.lax.ragged_all_to_all`: with top-22 of 512 experts (Super, Ultra)
a token's copies reach ~7.6 of 8 expert devices, so sending each copy costs about k/ep = 2.75x the
all-gather's bytes (docs/expert_parallelism.md has the volumes); all-to-all wins from about ep > k,
and it does not run on CPU, where this path is tested.

Buffer: dropless by default. A token's k experts are distinct, so at most min(k, E/ep) of its copies
land on one device: the buffer holds that many rows per gathered token (the worst case exactly).
With a capacity factor each local expert takes at most ceil(cf * T * k / E) copies (GShard's
expert capacity, first come first served in token order) and the rest are dropped and counted.

The experts are expert banks of any storage format (`nemojax.ops.expert_banks`: float, FP8, NVFP4),
multiplied with `bank_matmul`; a bank's arrays shard on their leading expert axis, and the feature
dimension over "tensor" when it splits evenly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from nemojax.ops.expert_banks import Bank, as_bank, bank_matmul, bank_specs, num_experts, splits_features
from nemojax.sharding import context_mesh

TOKEN_AXES = ("data", "fsdp", "expert")


class ExpertStats(NamedTuple):
    """Rows the grouped matmuls multiplied on each expert-parallel group of devices ([ep] int32), and
    token copies dropped for capacity (int32 scalar; 0 when dropless)."""

    routed_rows: jax.Array
    dropped_rows: jax.Array


def uses_expert_parallelism(mesh: Mesh | AbstractMesh | None, num_experts: int) -> bool:
    """True when `mesh` has an expert axis larger than 1 that divides the number of experts."""
    ep = 1 if mesh is None or mesh.empty else dict(mesh.shape).get("expert", 1)
    return ep > 1 and num_experts % ep == 0


def expert_capacity(tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Copies one expert accepts from `tokens` tokens routed to k of `num_experts` experts each."""
    return max(1, math.ceil(capacity_factor * tokens * k / num_experts))


def _divisible_axes(candidates: tuple[str, ...], size: int, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    kept: tuple[str, ...] = ()
    for axis in candidates:
        n = mesh_shape.get(axis, 1)
        if n > 1 and size % (math.prod(mesh_shape[a] for a in kept) * n) == 0:
            kept += (axis,)
    return kept


def _buffer_order(key_c: jax.Array, num_local: int, rows: int, capacity: int | None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Copies (flattened [m*k], `key` = local expert or num_local for elsewhere) sorted into a buffer
    of `rows`: (order [rows] copy index per buffer row, group sizes [num_local], dropped count)."""
    counts = jnp.bincount(key_c, length=num_local + 1)[:num_local]
    order = jnp.argsort(key_c, stable=True)
    if capacity is None:
        return order[:rows], counts, jnp.zeros((), jnp.int32)
    sorted_key = key_c[order]
    starts = jnp.cumsum(counts) - counts
    position = jnp.arange(key_c.shape[0]) - starts[jnp.minimum(sorted_key, num_local - 1)]
    kept = (sorted_key < num_local) & (position < capacity)
    order = order[jnp.argsort(jnp.where(kept, sorted_key, num_local), stable=True)]
    sizes = jnp.minimum(counts, capacity)
    return order[:rows], sizes, (jnp.sum(counts) - jnp.sum(sizes)).astype(jnp.int32)


def local_experts(x_md: jax.Array, local_ids_mk: jax.Array, weights_mk: jax.Array, up: Bank, down: Bank,
                  activation: Callable[[jax.Array], jax.Array], capacity: int | None = None,
                  kernels: str = "auto") -> tuple[jax.Array, jax.Array, jax.Array]:
    """sum over copies routed to this device's experts (ids in [0, E_local)); other ids contribute 0.
    `up` / `down` are expert banks (`nemojax.ops.expert_banks`) of the local experts; `kernels` chooses
    the NVFP4 matmul (`nemojax.ops.dispatch`), which runs on this device's rows.

    Returns (y [m, width] float32, rows multiplied (sum of the group sizes), copies dropped).
    """
    m, k = local_ids_mk.shape
    num_local = num_experts(up)
    is_local = (local_ids_mk >= 0) & (local_ids_mk < num_local)
    key = jnp.where(is_local, local_ids_mk, num_local).reshape(-1)
    rows = m * min(k, num_local) if capacity is None else min(m * min(k, num_local), num_local * capacity)
    order, group_sizes, dropped = _buffer_order(key, num_local, rows, capacity)
    routed = jnp.sum(group_sizes)
    real = jnp.arange(rows) < routed  # rows past the routed ones are padding: not in any group
    token = order // k
    h = activation(bank_matmul(x_md[token], up, group_sizes, kernels=kernels, per_shard=True))
    y = bank_matmul(h, down, group_sizes, kernels=kernels, per_shard=True).astype(jnp.float32)
    y = jnp.where(real[:, None], y * weights_mk.reshape(-1)[order][:, None], 0.0)
    return jnp.zeros((m, y.shape[-1]), jnp.float32).at[token].add(y), routed.astype(jnp.int32), dropped


@jax.custom_vjp
def _gather_tokens(x_td: jax.Array) -> jax.Array:
    """All-gather over "expert" whose backward reduce-scatters the gradient in float32."""
    return jax.lax.all_gather(x_td, "expert", tiled=True)


def _gather_tokens_fwd(x_td):
    return _gather_tokens(x_td), None


def _gather_tokens_bwd(_, g_td):
    return (jax.lax.psum_scatter(g_td.astype(jnp.float32), "expert", scatter_dimension=0, tiled=True
                                 ).astype(g_td.dtype),)


_gather_tokens.defvjp(_gather_tokens_fwd, _gather_tokens_bwd)


def expert_parallel_moe(x_td: jax.Array, ids_tk: jax.Array, weights_tk: jax.Array, up: Bank | jax.Array,
                        down: Bank | jax.Array, activation: Callable[[jax.Array], jax.Array],
                        mesh: Mesh | AbstractMesh | None = None, *, capacity_factor: float | None = None,
                        kernels: str = "auto") -> tuple[jax.Array, ExpertStats]:
    """Routed experts with experts spread over the mesh's "expert" axis; equals `dropless_experts`
    when dropless. `up` / `down`: expert banks of any storage format (a bare array is a float bank);
    `kernels` chooses the NVFP4 matmul (`nemojax.ops.dispatch`). Uses the context mesh
    (`nemojax.sharding.use_mesh`) by default.

    Returns (y [t, width] float32, ExpertStats).
    """
    up, down = as_bank(up), as_bank(down)
    mesh = context_mesh() if mesh is None else mesh
    shape = dict(mesh.shape)
    t, k = ids_tk.shape
    token_axes = _divisible_axes(TOKEN_AXES, t, shape)
    gathered = "expert" in token_axes
    parts = shape.get("tensor", 1)
    splits = parts > 1 and splits_features(up, "out", parts) and splits_features(down, "in", parts)
    tensor = "tensor" if splits else None
    rows = PartitionSpec(token_axes or None, None)
    row_axes = tuple(a for a in token_axes if a != "expert")  # devices holding different tokens, same experts
    group_tokens = t // math.prod(shape[a] for a in row_axes)
    capacity = None if capacity_factor is None else expert_capacity(group_tokens, k, num_experts(up), capacity_factor)

    def per_device(x, ids, weights, up, down):
        if gathered:
            x = _gather_tokens(x)
            ids, weights = (jax.lax.all_gather(a, "expert", tiled=True) for a in (ids, weights))
        else:
            # Explicitly varying: gathering rows of an expert-invariant x by expert-varying indices
            # otherwise gives wrong gradients for x (seen with jax 0.10.2).
            x, weights = jax.lax.pcast((x, weights), "expert", to="varying")
        first = jax.lax.axis_index("expert") * num_experts(up)
        y, routed, dropped = local_experts(x, ids - first, weights, up, down, activation, capacity, kernels)
        if tensor:
            y = jax.lax.psum(y, tensor)
        if row_axes:
            routed, dropped = jax.lax.psum((routed, dropped), row_axes)
        dropped = jax.lax.psum(dropped, "expert")
        if gathered:
            y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
        else:
            y = jax.lax.psum(y, "expert")
        return y, routed[None], dropped

    y, routed, dropped = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(rows, rows, rows, bank_specs(up, "expert", "out", tensor), bank_specs(down, "expert", "in", tensor)),
        out_specs=(rows, PartitionSpec("expert"), PartitionSpec()),
    )(x_td, ids_tk, weights_tk, up, down)
    return y, ExpertStats(routed, dropped)


def expert_parallel_experts(x_td: jax.Array, ids_tk: jax.Array, weights_tk: jax.Array, up: Bank | jax.Array,
                            down: Bank | jax.Array, activation: Callable[[jax.Array], jax.Array],
                            mesh: Mesh | AbstractMesh | None = None, *, capacity_factor: float | None = None,
                            kernels: str = "auto") -> jax.Array:
    """`expert_parallel_moe` without the statistics: [t, width] float32."""
    return expert_parallel_moe(x_td, ids_tk, weights_tk, up, down, activation, mesh,
                               capacity_factor=capacity_factor, kernels=kernels)[0]
