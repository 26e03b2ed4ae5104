"""Decoding-cache surgery: rolling back after speculative verification, and compacting KV caches.

The caches are the pytrees of `nemojax.model.init_cache`. One write index is shared by the batch;
a row that keeps fewer positions than another leaves invalid holes in its KV cache, which is exact
because Nemotron-H attention has no positional encoding (a masked key is as good as an absent one).
Invariant kept here: no KV entry at or beyond the write index is valid. Every function takes the
main stack's caches in either layout (per layer, or stacked per kind with scanned layers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

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


def keep_positions(layer_caches: LayerCaches, kinds: Sequence[str], start: jax.Array, keep_b: jax.Array
                   ) -> LayerCaches:
    """After a forward of t tokens written at `start` with per-position Mamba states, keep the first
    `keep_b` of them in each row: Mamba layers take the states after position keep-1 (a row keeping
    0 positions is left at position 0's state; such rows are finished and ignored), attention layers
    mark the rest invalid."""
    def keep(kind: str, cache: Any) -> Any:
        if kind == "mamba":
            last = jnp.maximum(keep_b - 1, 0)
            return {name: _take_position(state, last) for name, state in cache.items()}
        positions = jnp.arange(cache["valid"].shape[1])[None, :]
        return dict(cache, valid=cache["valid"] & (positions < start + keep_b[:, None]))

    return map_layer_caches(layer_caches, kinds, keep)


def _take_position(states_bt: jax.Array, position_b: jax.Array) -> jax.Array:
    index = position_b.reshape((-1,) + (1,) * (states_bt.ndim - 1))
    return jnp.take_along_axis(states_bt, index, axis=1)[:, 0]


def invalidate_from(layer_caches: LayerCaches, kinds: Sequence[str], index: jax.Array) -> LayerCaches:
    """Mark every KV entry at or beyond `index` invalid (drops speculative writes past the commit point)."""
    def invalidate(kind: str, cache: Any) -> Any:
        if kind != "attention":
            return cache
        positions = jnp.arange(cache["valid"].shape[1])[None, :]
        return dict(cache, valid=cache["valid"] & (positions < index))

    return map_layer_caches(layer_caches, kinds, invalidate)


def _first_valid(layer_caches: LayerCaches, kinds: Sequence[str]) -> jax.Array | None:
    """The [b, max_len] validity of the first attention layer (all attention layers share it), or None."""
    if isinstance(layer_caches, dict):
        return layer_caches["attention"]["valid"][0] if "attention" in layer_caches else None
    for cache, kind in zip(layer_caches, kinds, strict=True):
        if kind == "attention":
            return cache["valid"]
    return None


def compact(cache: Cache, kinds: Sequence[str]) -> Cache:
    """Move each row's valid KV entries to the front (order kept) and lower the index to the longest row.

    Exact (no positional encoding) and needed only when holes left by speculation fill the cache.
    """
    valid = _first_valid(cache["layers"], kinds)
    if valid is None:
        return cache
    order = jnp.argsort(~valid, axis=1, stable=True)

    def move(kind: str, layer: Any) -> Any:
        if kind != "attention":
            return layer
        return {
            "k": jnp.take_along_axis(layer["k"], order[:, None, :, None], axis=2),  # [b, kv_heads, s, d]
            "v": jnp.take_along_axis(layer["v"], order[:, None, :, None], axis=2),
            "valid": jnp.take_along_axis(layer["valid"], order, axis=1),
        }

    index = jnp.max(jnp.sum(valid, axis=1)).astype(cache["index"].dtype)
    return dict(cache, layers=map_layer_caches(cache["layers"], kinds, move), index=index)


def compact_if_needed(cache: Cache, kinds: Sequence[str], room: int) -> Cache:
    """Compact when fewer than `room` slots remain after the write index."""
    valid = _first_valid(cache["layers"], kinds)
    if valid is None:
        return cache
    return jax.lax.cond(cache["index"] + room > valid.shape[1], lambda c: compact(c, kinds), lambda c: c, cache)
