"""Grouped (ragged) matmul for dropless MoE, pure-JAX reference.

`grouped_matmul(x_mk, w_ekn, group_sizes_e)` multiplies consecutive row blocks of `x` (rows sorted
by group, `group_sizes[e]` rows for group e) by their group's weight `w[e]`.

On GPU and TPU it lowers to `jax.lax.ragged_dot`, which XLA implements natively. On CPU,
`ragged_dot` expands every group (about 36x a dense matmul at 32 groups), so there the rows are laid
out in fixed-size tiles that each belong to one group (a group wastes at most one partial tile), one
weight is gathered per tile and one batched matmul runs: the dense FLOPs plus at most `E * tile`
padding rows, at the price of a weight copy per tile (fine on CPU, too much memory for GPU-sized
experts, hence the split). Both differentiate like any JAX code. The Pallas FP4 kernel
(`pallas_kernels/fp4_moe.py`) will take the same arguments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _tile_rows(m: int, num_groups: int) -> int:
    """A tile height that keeps padding small relative to the rows per group."""
    per_group = max(1, m // max(1, num_groups))
    tile = 8
    while tile < 128 and tile * 2 <= per_group:
        tile *= 2
    return tile


def grouped_matmul(
    x_mk: jax.Array,
    w_ekn: jax.Array,
    group_sizes_e: jax.Array,
    *,
    tile: int | None = None,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """y[i] = x[i] @ w[group(i)] for rows sorted by group. Returns [m, n].

    Rows past sum(group_sizes) come back as zeros.
    """
    tiled = functools.partial(grouped_matmul_tiled, tile=tile, preferred_element_type=preferred_element_type)
    ragged = functools.partial(jax.lax.ragged_dot, preferred_element_type=preferred_element_type)
    return jax.lax.platform_dependent(x_mk, w_ekn, group_sizes_e.astype(jnp.int32), cpu=tiled, default=ragged)


def grouped_matmul_tiled(
    x_mk: jax.Array,
    w_ekn: jax.Array,
    group_sizes_e: jax.Array,
    *,
    tile: int | None = None,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """The CPU lowering of `grouped_matmul`: one-group tiles, one gathered weight per tile.

    With no more rows than groups (decoding a few tokens) tiles would be mostly padding, so each row
    gathers its own weight instead (2-3x faster there, measured in bench/).
    """
    m, k = x_mk.shape
    num_groups, _, n = w_ekn.shape
    if m <= num_groups:
        return _per_row(x_mk, w_ekn, group_sizes_e.astype(jnp.int32), preferred_element_type)
    tile = tile or _tile_rows(m, num_groups)
    num_tiles = -(-m // tile) + num_groups  # static upper bound on the tiles needed
    sizes = group_sizes_e.astype(jnp.int32)
    padded = -(-sizes // tile) * tile
    start = jnp.cumsum(sizes) - sizes
    padded_start = jnp.cumsum(padded) - padded
    padded_end = padded_start + padded

    # Where each padded slot reads from (and whether it holds a real row).
    slot = jnp.arange(num_tiles * tile, dtype=jnp.int32)
    slot_group = jnp.minimum(jnp.searchsorted(padded_end, slot, side="right"), num_groups - 1)
    offset = slot - padded_start[slot_group]
    real = offset < sizes[slot_group]
    src = jnp.where(real, start[slot_group] + offset, 0)
    x_tiles = jnp.where(real[:, None], x_mk[src], 0).reshape(num_tiles, tile, k)
    tile_group = slot_group[::tile]
    y_tiles = jnp.einsum("tik,tkn->tin", x_tiles, w_ekn[tile_group],
                         preferred_element_type=preferred_element_type)

    # Row i of x sits at slot padded_start[g] + (i - start[g]) of its group g.
    row = jnp.arange(m, dtype=jnp.int32)
    row_group = jnp.minimum(jnp.searchsorted(start + sizes, row, side="right"), num_groups - 1)
    row_slot = padded_start[row_group] + row - start[row_group]
    y = y_tiles.reshape(num_tiles * tile, n)[row_slot]
    return jnp.where((row < jnp.sum(sizes))[:, None], y, 0)


def _per_row(x_mk: jax.Array, w_ekn: jax.Array, sizes: jax.Array, preferred_element_type) -> jax.Array:
    row = jnp.arange(x_mk.shape[0], dtype=jnp.int32)
    end = jnp.cumsum(sizes)
    row_group = jnp.minimum(jnp.searchsorted(end, row, side="right"), w_ekn.shape[0] - 1)
    y = jnp.einsum("mk,mkn->mn", x_mk, w_ekn[row_group], preferred_element_type=preferred_element_type)
    return jnp.where((row < end[-1])[:, None], y, 0)
