"""Grouped (ragged) matmul for dropless MoE, pure-JAX reference.

`grouped_matmul(x_mk, w_ekn, group_sizes_e)` multiplies consecutive row blocks of `x` (rows sorted
by group, `group_sizes[e]` rows for group e) by their group's weight `w[e]`.

Three lowerings, chosen statically from the number of rows m and groups G:
- GPU/TPU: `jax.lax.ragged_dot`. XLA on GPU expands it over every group (each expert's weight is read
  whatever the routing), so with fewer rows than groups (decoding) the weights of the non-empty groups
  are gathered first and the ragged_dot runs over those m slots only.
- CPU, m <= `LOOP_MAX_ROWS`: a loop over the non-empty one-group tiles of rows, as many iterations as
  there are such tiles (decoding: about one per distinct expert routed); each slices its group's
  weight once and multiplies its rows. `ragged_dot` on CPU expands every group (about 36x a dense
  matmul at 32 groups), and gathering a weight copy per row or per static tile moves bytes in
  proportion to the rows instead of the distinct groups.
- CPU, larger m: rows laid out in a static number of fixed-size tiles that each belong to one group
  (a group wastes at most one partial tile), one weight gathered per tile and one batched matmul: the
  dense FLOPs plus at most `G * tile` padding rows.
The crossover was measured (bench/grouped_matmul.py, bench/results/grouped_matmul.md): the loop was
faster at every size timed up to 16384 rows, with and without gradients, its lead shrinking with m.
The weights may be stored in another dtype than the rows (FP8 experts, float32 parameters with
bfloat16 compute): each lowering casts a weight to the rows' dtype after choosing it, so a decoding
step converts only the routed experts, never the whole bank.
All three give the same values up to float rounding and differentiate like JAX code (the loop has a
backward of its own over the same tiles). The Pallas FP4 kernel (`pallas_kernels/fp4_moe.py`) will
take the same arguments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

LOOP_MAX_ROWS = 16384  # CPU: the per-tile loop up to this many rows, the static tiles above (measured)


def grouped_matmul(
    x_mk: jax.Array,
    w_ekn: jax.Array,
    group_sizes_e: jax.Array,
    *,
    tile: int | None = None,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """y[i] = x[i] @ w[group(i)] for rows sorted by group (sum(group_sizes) <= m). Returns [m, n] in
    `preferred_element_type`, else x's dtype (w is cast to x's dtype, per chosen weight).

    Rows past sum(group_sizes) come back as zeros. `tile` fixes the CPU tile height (rows per tile).
    """
    m, num_groups = x_mk.shape[0], w_ekn.shape[0]
    if m <= LOOP_MAX_ROWS:
        cpu = functools.partial(grouped_matmul_loop, rows=tile, preferred_element_type=preferred_element_type)
    else:
        cpu = functools.partial(grouped_matmul_tiled, tile=tile, preferred_element_type=preferred_element_type)
    ragged = grouped_matmul_distinct if m < num_groups else _ragged_dot_all
    default = functools.partial(ragged, preferred_element_type=preferred_element_type)
    return jax.lax.platform_dependent(x_mk, w_ekn, group_sizes_e.astype(jnp.int32), cpu=cpu, default=default)


def _ragged_dot_all(x_mk: jax.Array, w_ekn: jax.Array, group_sizes_e: jax.Array, *,
                    preferred_element_type: jnp.dtype | None = None) -> jax.Array:
    """`ragged_dot` over every group (as many rows as groups or more: most groups are read anyway)."""
    return jax.lax.ragged_dot(x_mk, w_ekn.astype(x_mk.dtype), group_sizes_e,
                              preferred_element_type=preferred_element_type)


def _tile_rows(m: int, num_groups: int) -> int:
    """A tile height that keeps padding small relative to the rows per group."""
    per_group = max(1, m // max(1, num_groups))
    tile = 8
    while tile < 128 and tile * 2 <= per_group:
        tile *= 2
    return tile


def _loop_tile_rows(m: int, num_groups: int) -> int:
    """Rows per loop tile: about twice the mean rows per group, so that most groups need one tile."""
    mean = -(-m // max(1, num_groups))
    rows = 4
    while rows < 64 and rows < 2 * mean:
        rows *= 2
    return rows


def grouped_matmul_tiled(
    x_mk: jax.Array,
    w_ekn: jax.Array,
    group_sizes_e: jax.Array,
    *,
    tile: int | None = None,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """The CPU lowering of `grouped_matmul` for many rows: static one-group tiles, one gathered weight per tile."""
    m, k = x_mk.shape
    num_groups, _, n = w_ekn.shape
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
    y_tiles = jnp.einsum("tik,tkn->tin", x_tiles, w_ekn[tile_group].astype(x_mk.dtype),
                         preferred_element_type=preferred_element_type)

    # Row i of x sits at slot padded_start[g] + (i - start[g]) of its group g.
    row = jnp.arange(m, dtype=jnp.int32)
    row_group = jnp.minimum(jnp.searchsorted(start + sizes, row, side="right"), num_groups - 1)
    row_slot = padded_start[row_group] + row - start[row_group]
    y = y_tiles.reshape(num_tiles * tile, n)[row_slot]
    return jnp.where((row < jnp.sum(sizes))[:, None], y, 0)


def grouped_matmul_loop(
    x_mk: jax.Array,
    w_ekn: jax.Array,
    group_sizes_e: jax.Array,
    *,
    rows: int | None = None,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """The CPU lowering of `grouped_matmul` for few rows: a loop over the non-empty one-group tiles of
    `rows` rows (a group of s rows takes ceil(s / rows) tiles), each multiplied by its group's weight."""
    rows = rows or _loop_tile_rows(x_mk.shape[0], w_ekn.shape[0])
    return _tile_loop(x_mk, w_ekn, group_sizes_e.astype(jnp.int32), rows,
                      jnp.dtype(preferred_element_type or x_mk.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tile_loop(x_mk, w_ekn, sizes_e, rows: int, out_dtype):
    return _tile_loop_forward(x_mk, w_ekn, sizes_e, rows, out_dtype)[0]


def _loop_tiles(m: int, num_groups: int, sizes_e: jax.Array, rows: int):
    """The non-empty one-group tiles: (how many, and per tile its group, first row and real row count)."""
    tiles_e = -(-sizes_e // rows)
    tiles_end_e = jnp.cumsum(tiles_e)
    start_e = jnp.cumsum(sizes_e) - sizes_e
    max_tiles = -(-m // rows) + min(num_groups, m)  # each non-empty group wastes less than one tile
    tile = jnp.arange(max_tiles, dtype=jnp.int32)
    group = jnp.minimum(jnp.sum(tiles_end_e[None, :] <= tile[:, None], axis=1), num_groups - 1)
    first_row = start_e[group] + (tile - (tiles_end_e - tiles_e)[group]) * rows
    count = jnp.minimum(rows, start_e[group] + sizes_e[group] - first_row)
    return tiles_end_e[-1], group, first_row, count


def _padded_rows(a_mk: jax.Array, rows: int) -> jax.Array:
    """`a` with `rows` zero rows appended, so that a window of `rows` never runs off the end."""
    return jnp.concatenate([a_mk, jnp.zeros((rows,) + a_mk.shape[1:], a_mk.dtype)])


def _zeros_like_both(a: jax.Array, b: jax.Array, shape: tuple[int, int], dtype) -> jax.Array:
    """Zeros of `shape` typed like a combination of `a` and `b` (inside `shard_map` a loop carry must vary
    over the same mesh axes as the values the loop body adds to it)."""
    return jnp.zeros(shape, dtype) + jnp.sum(jnp.zeros_like(a, dtype=dtype)) + jnp.sum(jnp.zeros_like(b, dtype=dtype))


def _tile_loop_forward(x_mk, w_ekn, sizes_e, rows: int, out_dtype):
    """Tiles run in row order and each writes its whole window: rows past its count belong to the next
    tile, which overwrites them; rows past the last group are zeroed at the end."""
    m = x_mk.shape[0]
    num_tiles, group, first_row, _ = _loop_tiles(m, w_ekn.shape[0], sizes_e, rows)
    x_pad = _padded_rows(x_mk, rows)

    def one_tile(i, y):
        window = jax.lax.dynamic_slice_in_dim(x_pad, first_row[i], rows)
        w_kn = jax.lax.dynamic_index_in_dim(w_ekn, group[i], keepdims=False).astype(x_mk.dtype)
        out = jnp.dot(window, w_kn, preferred_element_type=out_dtype)
        return jax.lax.dynamic_update_slice_in_dim(y, out, first_row[i], 0)

    y = jax.lax.fori_loop(0, num_tiles, one_tile, _zeros_like_both(x_mk, w_ekn, (m + rows, w_ekn.shape[2]), out_dtype))
    y = jnp.where((jnp.arange(m) < jnp.sum(sizes_e))[:, None], y[:m], 0)
    return y, (x_mk, w_ekn, sizes_e)


def _tile_loop_backward(rows: int, out_dtype, residuals, g_mn):
    """The same tiles: dx = g w[group]^T per tile, dw[group] += x^T g per tile (float32 sums)."""
    del out_dtype
    x_mk, w_ekn, sizes_e = residuals
    m = x_mk.shape[0]
    num_tiles, group, first_row, count = _loop_tiles(m, w_ekn.shape[0], sizes_e, rows)
    x_pad, g_pad = _padded_rows(x_mk, rows), _padded_rows(g_mn, rows)
    row = jnp.arange(rows)[:, None]

    def one_tile(i, carry):
        dx, dw = carry
        mine = row < count[i]  # the window's other rows belong to the next group
        window_x = jnp.where(mine, jax.lax.dynamic_slice_in_dim(x_pad, first_row[i], rows), 0)
        window_g = jnp.where(mine, jax.lax.dynamic_slice_in_dim(g_pad, first_row[i], rows), 0)
        w_kn = jax.lax.dynamic_index_in_dim(w_ekn, group[i], keepdims=False)
        dx_window = jnp.dot(window_g, w_kn.T.astype(window_g.dtype), preferred_element_type=jnp.float32)
        dx = jax.lax.dynamic_update_slice_in_dim(dx, dx_window, first_row[i], 0)  # the next tile rewrites its rows
        dw_kn = jax.lax.dynamic_index_in_dim(dw, group[i], keepdims=False) + jnp.dot(
            window_x.T, window_g.astype(window_x.dtype), preferred_element_type=jnp.float32)
        return dx, jax.lax.dynamic_update_index_in_dim(dw, dw_kn, group[i], 0)

    dx0 = _zeros_like_both(g_mn, w_ekn, (m + rows, x_mk.shape[1]), jnp.float32)
    dw0 = _zeros_like_both(g_mn, x_mk, (w_ekn.shape[0], w_ekn.shape[1] * w_ekn.shape[2]), jnp.float32)
    dx, dw = jax.lax.fori_loop(0, num_tiles, one_tile, (dx0, dw0.reshape(w_ekn.shape)))
    return (_cotangent_like(x_mk, dx[:m]), _cotangent_like(w_ekn, dw), np.zeros(sizes_e.shape, jax.dtypes.float0))


def _cotangent_like(primal: jax.Array, ct: jax.Array) -> jax.Array:
    """`ct` as the cotangent of `primal`: in its dtype and, inside `shard_map`, summed over the mesh axes it
    varies over and `primal` does not (what autodiff does for a value used by mesh-varying computations)."""
    _, pull = jax.vjp(lambda p: p.astype(ct.dtype) + jnp.zeros_like(ct), primal)
    return pull(ct)[0]


_tile_loop.defvjp(_tile_loop_forward, _tile_loop_backward)


def grouped_matmul_distinct(
    x_mk: jax.Array,
    w_ekn: jax.Array,
    group_sizes_e: jax.Array,
    *,
    preferred_element_type: jnp.dtype | None = None,
) -> jax.Array:
    """`ragged_dot` over the non-empty groups only: their weights (at most min(m, G)) are gathered in
    group order into min(m, G) slots (spare slots repeat the last one, with no rows), then one ragged_dot."""
    slots = min(x_mk.shape[0], w_ekn.shape[0])
    sizes = group_sizes_e.astype(jnp.int32)
    present = sizes > 0
    order = jnp.argsort(~present, stable=True)[:slots]  # non-empty groups first, in group order
    count = jnp.sum(present)
    slot = jnp.arange(slots)
    slot_group = order[jnp.minimum(slot, jnp.maximum(count - 1, 0))]
    slot_sizes = jnp.where(slot < count, sizes[order], 0)
    return jax.lax.ragged_dot(x_mk, w_ekn[slot_group].astype(x_mk.dtype), slot_sizes,
                              preferred_element_type=preferred_element_type)
