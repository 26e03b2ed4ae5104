"""The routed experts' two projections, act(x @ up[g]) @ down[g], for rows sorted by expert group.

`grouped_mlp` equals two grouped matmuls (float32 products cast to the rows' dtype, as the float
experts' `expert_matmul`) with the activation between them (the reference, used
on GPU/TPU and for many rows). On CPU at decoding sizes (at most FUSED_MAX_ROWS rows) it runs one loop
over the non-empty one-group tiles of rows that applies both projections of a tile's expert before
moving on: half the loop iterations of two grouped matmuls, and the tile's hidden activations never
leave the cache (measured faster at batch 1 and 8 in bench/serve.py's model, see
bench/results/decode_scaling.md). The products are the same ones,
in the same dtypes, so the values are equal. Its backward is the reference's (recomputed), so
training at these sizes pays one extra forward of the experts; larger batches take the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.ops.grouped_matmul import _loop_tile_rows, _loop_tiles, _padded_rows, _zeros_like_both, grouped_matmul

FUSED_MAX_ROWS = 256  # CPU: the fused loop up to this many rows (decoding batches up to 64 at top-4)


def grouped_mlp(x_mk: jax.Array, up_ekf: jax.Array, down_efn: jax.Array, group_sizes_e: jax.Array,
                activation: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """activation(x[i] @ up[g]) @ down[g] with g the group of row i (rows sorted by group); [m, n] in x's
    dtype, zeros past sum(group_sizes). Weights are cast to x's dtype per chosen expert."""
    sizes = group_sizes_e.astype(jnp.int32)
    reference = functools.partial(_reference, activation=activation)
    if x_mk.shape[0] > FUSED_MAX_ROWS:
        return reference(x_mk, up_ekf, down_efn, sizes)
    rows = _loop_tile_rows(x_mk.shape[0], up_ekf.shape[0])
    fused = functools.partial(_fused_loop, activation=activation, rows=rows)
    return jax.lax.platform_dependent(x_mk, up_ekf, down_efn, sizes, cpu=fused, default=reference)


def _projection(x_mk: jax.Array, w_ekn: jax.Array, sizes_e: jax.Array) -> jax.Array:
    """One projection as the float experts compute it (`nemojax.ops.expert_banks.expert_matmul`): float32
    products, cast back to the rows' dtype."""
    return grouped_matmul(x_mk, w_ekn, sizes_e, preferred_element_type=jnp.float32).astype(x_mk.dtype)


def _reference(x_mk, up_ekf, down_efn, sizes_e, *, activation):
    return _projection(activation(_projection(x_mk, up_ekf, sizes_e)), down_efn, sizes_e)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(x_mk, up_ekf, down_efn, sizes_e, activation, rows: int):
    return _fused_forward(x_mk, up_ekf, down_efn, sizes_e, activation, rows)[0]


def _fused_loop(x_mk, up_ekf, down_efn, sizes_e, *, activation, rows: int):
    return _fused(x_mk, up_ekf, down_efn, sizes_e, activation, rows)


def _fused_forward(x_mk, up_ekf, down_efn, sizes_e, activation, rows: int):
    """Tiles in row order, each writing its whole window (rows past its count belong to the next tile,
    which overwrites them), as `grouped_matmul_loop` does."""
    m, dtype = x_mk.shape[0], x_mk.dtype
    num_tiles, group, first_row, _ = _loop_tiles(m, up_ekf.shape[0], sizes_e, rows)
    x_pad = _padded_rows(x_mk, rows)

    def one_tile(i, y):
        window = jax.lax.dynamic_slice_in_dim(x_pad, first_row[i], rows)
        up_kf = jax.lax.dynamic_index_in_dim(up_ekf, group[i], keepdims=False).astype(dtype)
        down_fn = jax.lax.dynamic_index_in_dim(down_efn, group[i], keepdims=False).astype(dtype)
        h = activation(jnp.dot(window, up_kf, preferred_element_type=jnp.float32).astype(dtype))
        out = jnp.dot(h, down_fn, preferred_element_type=jnp.float32).astype(dtype)
        return jax.lax.dynamic_update_slice_in_dim(y, out, first_row[i], 0)

    y0 = _zeros_like_both(x_mk, up_ekf, (m + rows, down_efn.shape[2]), dtype) + jnp.sum(
        jnp.zeros_like(down_efn, dtype=dtype))
    y = jax.lax.fori_loop(0, num_tiles, one_tile, y0)
    y = jnp.where((jnp.arange(m) < jnp.sum(sizes_e))[:, None], y[:m], 0)
    return y, (x_mk, up_ekf, down_efn, sizes_e)


def _fused_backward(activation, rows: int, residuals, g_mn):
    """The reference's gradients (its forward recomputed)."""
    del rows
    x_mk, up_ekf, down_efn, sizes_e = residuals
    _, pull = jax.vjp(lambda x, up, down: _reference(x, up, down, sizes_e, activation=activation),
                      x_mk, up_ekf, down_efn)
    return (*pull(g_mn), np.zeros(sizes_e.shape, jax.dtypes.float0))


_fused.defvjp(_fused_forward, _fused_backward)
