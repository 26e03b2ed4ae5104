"""Decoding-cache surgery: rows of the batch (take, put, reset), more room along the sequence, and
rolling back after speculative verification.

The caches are the pytrees of `nemojax.model.init_cache`: every row has its own write position
(`index` [b]) and KV entry j of a row holds position j of that row's sequence (see
`nemojax.model.attention`). Rolling back is therefore only lowering a row's index (and choosing
its Mamba states): entries past the index are hidden by causality until they are overwritten. A
slot of the batch is reused by resetting its row. Every function takes the main stack's caches in
either layout (per layer, or stacked per kind with scanned layers); which axis of a leaf is the batch
or the sequence is read from the one cache-axes table (`nemojax.sharding.cache_axes`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nemojax.sharding import cache_axes

Cache = dict[str, Any]
LayerCaches = tuple[Any, ...] | dict[str, Any]  # per layer (a tuple) or stacked per kind (scanned layers)


def map_layer_caches(layer_caches: LayerCaches, kinds: Sequence[str], fn: Callable[[str, Any], Any]) -> LayerCaches:
    """Apply `fn(kind, one layer's cache)` to every attention and Mamba layer's cache, in either layout:
    per layer (a tuple, `kinds` the layer list) or stacked per kind (a dict; `fn` is vmapped over the
    stacked layers)."""
    if isinstance(layer_caches, dict):
        return {kind: jax.vmap(lambda c, kind=kind: fn(kind, c))(stack) for kind, stack in layer_caches.items()}
    return tuple(cache if kind not in ("attention", "mamba") else fn(kind, cache)
                 for cache, kind in zip(layer_caches, kinds, strict=True))


def keep_positions(new_layers: LayerCaches, old_layers: LayerCaches, kinds: Sequence[str], keep_b: jax.Array
                   ) -> LayerCaches:
    """After a forward with per-position Mamba states (`new_layers`), keep the first `keep_b` positions of
    each row: Mamba layers take the states after position keep-1, or the states before the forward
    (`old_layers`) for a row that keeps nothing. Attention layers are unchanged: the caller sets each
    row's index to its start + keep."""
    def keep(kind: str, caches: tuple[Any, Any]) -> Any:
        new, old = caches
        if kind != "mamba":
            return new
        last = jnp.maximum(keep_b - 1, 0)
        return {name: jnp.where(_rows(keep_b > 0, old[name].ndim), _take_position(state, last), old[name])
                for name, state in new.items()}

    if isinstance(new_layers, dict):
        return {kind: jax.vmap(lambda n, o, kind=kind: keep(kind, (n, o)))(new_layers[kind], old_layers[kind])
                for kind in new_layers}
    return tuple(new if kind != "mamba" else keep(kind, (new, old))
                 for new, old, kind in zip(new_layers, old_layers, kinds, strict=True))


def _rows(mask_b: jax.Array, ndim: int) -> jax.Array:
    return mask_b.reshape((-1,) + (1,) * (ndim - 1))


def _take_position(states_bt: jax.Array, position_b: jax.Array) -> jax.Array:
    index = position_b.reshape((-1,) + (1,) * (states_bt.ndim - 1))
    return jnp.take_along_axis(states_bt, index, axis=1)[:, 0]


def _map_leaves(cache: Any, fn: Callable[[jax.Array, tuple[str | None, ...]], jax.Array]) -> Any:
    """`fn(leaf, its logical axes)` on every cache leaf (main stack, MTP block and indices alike)."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(leaf, cache_axes(path[-1].key, leaf.ndim)), cache)


def take_rows(cache: Cache, rows_n: jax.Array) -> Cache:
    """The caches of rows `rows_n` of the batch, as a batch of n (an index past the end reads the last row)."""
    return _map_leaves(cache, lambda a, axes: jnp.take(a, rows_n, axis=axes.index("batch"), mode="clip"))


def put_rows(cache: Cache, rows_n: jax.Array, part: Cache) -> Cache:
    """`cache` with rows `rows_n` replaced by the batch `part` (rows past the end are dropped)."""
    def put(a: jax.Array, axes: tuple[str | None, ...], p: jax.Array) -> jax.Array:
        axis = axes.index("batch")
        where = (slice(None),) * axis + (rows_n,)
        return a.at[where].set(p.astype(a.dtype), mode="drop")

    return jax.tree_util.tree_map_with_path(
        lambda path, a, p: put(a, cache_axes(path[-1].key, a.ndim), p), cache, part)


def reset_rows(cache: Cache, fresh_b: jax.Array) -> Cache:
    """Rows where `fresh_b` start a new sequence: write position 0 and zero Mamba states. Their old KV
    entries stay: position 0 onwards is rewritten before causality lets anything see it."""
    def reset(a: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        if "length" in axes:
            return a
        mask = fresh_b.reshape((1,) * axes.index("batch") + (-1,) + (1,) * (a.ndim - axes.index("batch") - 1))
        return jnp.where(mask, jnp.zeros((), a.dtype), a)

    return _map_leaves(cache, reset)


def grow(cache: Cache, length: int) -> Cache:
    """The same caches with room for `length` positions per row (new entries empty)."""
    def pad(a: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        if "length" not in axes:
            return a
        axis = axes.index("length")
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, length - a.shape[axis])
        return jnp.pad(a, widths)

    return _map_leaves(cache, pad)


def capacity(cache: Cache) -> int | None:
    """Positions per row (None for a model without attention layers: Mamba states need no room)."""
    lengths = [leaf.shape[axes.index("length")] for path, leaf in jax.tree_util.tree_leaves_with_path(cache)
               if "length" in (axes := cache_axes(path[-1].key, leaf.ndim))]
    return min(lengths, default=None)


# ---------------------------------------------------------------- one row's positions and states (prefix reuse)
def _split(cache: Cache) -> tuple[list[tuple[tuple[str | None, ...], jax.Array]], Any]:
    """(each leaf with its logical axes, in flatten order; the tree structure)."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(cache)
    return [(cache_axes(path[-1].key, leaf.ndim), leaf) for path, leaf in pairs], treedef


def row_span(cache: Cache, row: jax.Array, start: jax.Array, size: int) -> tuple[jax.Array, ...]:
    """Positions [start, start + size) of row `row` of every leaf with a sequence axis (KV entries and their
    validity), in flatten order, without the batch axis."""
    span = []
    for axes, leaf in _split(cache)[0]:
        if "length" in axes:
            one = jnp.take(leaf, row, axis=axes.index("batch"))
            length = [a for a in axes if a != "batch"].index("length")
            span.append(jax.lax.dynamic_slice_in_dim(one, start, size, axis=length))
    return tuple(span)


def put_row_span(cache: Cache, row: jax.Array, start: jax.Array, span: Sequence[jax.Array]) -> Cache:
    """`cache` with `row_span(cache, row, start, len)` replaced by `span`."""
    leaves, treedef = _split(cache)
    pieces = iter(span)
    out = []
    for axes, leaf in leaves:
        if "length" in axes:
            corner = [jnp.int32(0)] * leaf.ndim
            corner[axes.index("batch")], corner[axes.index("length")] = row, start
            update = jnp.expand_dims(next(pieces).astype(leaf.dtype), axes.index("batch"))
            leaf = jax.lax.dynamic_update_slice(leaf, update, corner)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def row_states(cache: Cache, row: jax.Array) -> tuple[jax.Array, ...]:
    """Row `row` of every leaf without a sequence axis (Mamba conv and SSM states, write positions), in
    flatten order, without the batch axis."""
    return tuple(jnp.take(leaf, row, axis=axes.index("batch")) for axes, leaf in _split(cache)[0]
                 if "length" not in axes)


def put_row_states(cache: Cache, row: jax.Array, states: Sequence[jax.Array]) -> Cache:
    """`cache` with `row_states(cache, row)` replaced by `states`."""
    leaves, treedef = _split(cache)
    pieces = iter(states)
    out = []
    for axes, leaf in leaves:
        if "length" not in axes:
            leaf = leaf.at[(slice(None),) * axes.index("batch") + (row,)].set(next(pieces).astype(leaf.dtype))
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)
