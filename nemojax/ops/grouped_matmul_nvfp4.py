"""Grouped matmul over NVFP4-packed expert weights (W4A16), pure-JAX reference.

`grouped_matmul_nvfp4(x_mk, packed_enk, block_scale_enk, global_scale_e, group_sizes_e)` computes, for
rows of `x` sorted by expert (`group_sizes[e]` consecutive rows for expert e),

    out[i] = x[i] @ dequantize(W[group(i)]).T          W[e]: [N, K] in the ModelOpt layout

with rows past sum(group_sizes) returning zeros. The Pallas kernel (`pallas_kernels/fp4_moe.py`)
takes the same arguments.

The rows are laid out in one-expert tiles (as `nemojax.ops.grouped_matmul` does on CPU) and a scan
walks the tiles in expert order, dequantising an expert's weight when the tile's expert changes:
one expert's [N, K] weight is ever held in the compute dtype, never the bank, and each non-empty
expert is dequantised once. Tiles past the last row are skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.errors import QuantizationError
from nemojax.ops.grouped_matmul import _tile_rows
from nemojax.quant.nvfp4 import BLOCK, dequantize


def tile_layout(sizes: jax.Array, m: int, tile: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One-group tiles for rows sorted by group.

    Returns (src [slots]: the row each slot reads, real [slots]: whether it holds one, tile_group
    [tiles], row_slot [m]: where row i landed), with slots = tiles * tile and tiles a static bound.
    """
    num_groups = sizes.shape[0]
    num_tiles = -(-m // tile) + num_groups
    padded = -(-sizes // tile) * tile
    start = jnp.cumsum(sizes) - sizes
    padded_start = jnp.cumsum(padded) - padded
    slot = jnp.arange(num_tiles * tile, dtype=jnp.int32)
    slot_group = jnp.minimum(jnp.searchsorted(padded_start + padded, slot, side="right"), num_groups - 1)
    offset = slot - padded_start[slot_group]
    real = offset < sizes[slot_group]
    src = jnp.where(real, start[slot_group] + offset, 0)
    row = jnp.arange(m, dtype=jnp.int32)
    row_group = jnp.minimum(jnp.searchsorted(start + sizes, row, side="right"), num_groups - 1)
    row_slot = padded_start[row_group] + row - start[row_group]
    return src, real, slot_group[::tile], row_slot


def _check_shapes(x_mk, packed_enk, block_scale_enk, global_scale_e, group_sizes_e) -> None:
    e, n, half = packed_enk.shape
    k = x_mk.shape[-1]
    if (x_mk.ndim != 2 or 2 * half != k or k % BLOCK or block_scale_enk.shape != (e, n, k // BLOCK)
            or global_scale_e.shape != (e,) or group_sizes_e.shape != (e,)):
        raise QuantizationError(
            f"grouped_matmul_nvfp4: x {tuple(x_mk.shape)}, packed {tuple(packed_enk.shape)}, block_scale "
            f"{tuple(block_scale_enk.shape)}, global_scale {tuple(global_scale_e.shape)}, group_sizes "
            f"{tuple(group_sizes_e.shape)} disagree (expected [M, K], [E, N, K/2], [E, N, K/16], [E], [E])")


def grouped_matmul_nvfp4(
    x_mk: jax.Array,
    packed_enk: jax.Array,
    block_scale_enk: jax.Array,
    global_scale_e: jax.Array,
    group_sizes_e: jax.Array,
    *,
    tile: int | None = None,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """out[i] = x[i] @ dequantize(expert group(i)).T for rows sorted by expert; [M, N] in x's dtype
    (or `preferred_element_type`). The weight is dequantised to x's dtype (W4A16)."""
    _check_shapes(x_mk, packed_enk, block_scale_enk, global_scale_e, group_sizes_e)
    m, k = x_mk.shape
    num_experts, n, _ = packed_enk.shape
    out_dtype = preferred_element_type or x_mk.dtype
    tile = tile or _tile_rows(m, num_experts)
    sizes = group_sizes_e.astype(jnp.int32)
    src, real, tile_group, row_slot = tile_layout(sizes, m, tile)
    num_tiles = tile_group.shape[0]
    x_tiles = jnp.where(real[:, None], x_mk[src], 0).reshape(num_tiles, tile, k)
    used_tiles = jnp.sum(-(-sizes // tile))

    def weight(e: jax.Array) -> jax.Array:
        return dequantize(packed_enk[e], block_scale_enk[e], global_scale_e[e], x_mk.dtype)

    def step(carry, inputs):
        w_nk, current = carry
        index, x_tk, group = inputs
        used = index < used_tiles
        w_nk = jax.lax.cond(used & (group != current), weight, lambda _: w_nk, group)
        # An unused tile's rows are zero: x[:, :1] * w[:, 0] is a [tile, n] zero typed like the product
        # (inside shard_map both branches must vary over the same mesh axes).
        y_tn = jax.lax.cond(
            used,
            lambda: jnp.einsum("tk,nk->tn", x_tk, w_nk, preferred_element_type=out_dtype),
            lambda: (x_tk[:, :1] * w_nk[:, 0]).astype(out_dtype))
        return (w_nk, jnp.where(used, group, current)), y_tn

    # Start from the first tile's expert (also in the carry's sharding type inside shard_map).
    init = (weight(tile_group[0]), tile_group[0])
    indices = jnp.arange(num_tiles, dtype=jnp.int32)
    _, y_tiles = jax.lax.scan(step, init, (indices, x_tiles, tile_group))
    y = y_tiles.reshape(num_tiles * tile, n)[row_slot]
    return jnp.where((jnp.arange(m) < jnp.sum(sizes))[:, None], y, 0).astype(out_dtype)
