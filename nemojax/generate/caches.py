"""Decoding-cache surgery: rolling back after speculative verification, and compacting KV caches.

The caches are the pytrees of `nemojax.model.init_cache`. One write index is shared by the batch;
a row that keeps fewer positions than another leaves invalid holes in its KV cache, which is exact
because Nemotron-H attention has no positional encoding (a masked key is as good as an absent one).
Invariant kept here: no KV entry at or beyond the write index is valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Cache = dict[str, Any]


def keep_positions(layer_caches: Sequence[Any], kinds: Sequence[str], start: jax.Array, keep_b: jax.Array
                   ) -> tuple[Any, ...]:
    """After a forward of t tokens written at `start` with per-position Mamba states, keep the first
    `keep_b` of them in each row: Mamba layers take the states after position keep-1 (a row keeping
    0 positions is left at position 0's state; such rows are finished and ignored), attention layers
    mark the rest invalid."""
    out = []
    for cache, kind in zip(layer_caches, kinds, strict=True):
        if kind == "mamba":
            last = jnp.maximum(keep_b - 1, 0)
            out.append({name: _take_position(state, last) for name, state in cache.items()})
        elif kind == "attention":
            positions = jnp.arange(cache["valid"].shape[1])[None, :]
            out.append(dict(cache, valid=cache["valid"] & (positions < start + keep_b[:, None])))
        else:
            out.append(cache)
    return tuple(out)


def _take_position(states_bt: jax.Array, position_b: jax.Array) -> jax.Array:
    index = position_b.reshape((-1,) + (1,) * (states_bt.ndim - 1))
    return jnp.take_along_axis(states_bt, index, axis=1)[:, 0]


def invalidate_from(layer_caches: Sequence[Any], kinds: Sequence[str], index: jax.Array) -> tuple[Any, ...]:
    """Mark every KV entry at or beyond `index` invalid (drops speculative writes past the commit point)."""
    out = []
    for cache, kind in zip(layer_caches, kinds, strict=True):
        if kind == "attention":
            positions = jnp.arange(cache["valid"].shape[1])[None, :]
            cache = dict(cache, valid=cache["valid"] & (positions < index))
        out.append(cache)
    return tuple(out)


def compact(cache: Cache, kinds: Sequence[str]) -> Cache:
    """Move each row's valid KV entries to the front (order kept) and lower the index to the longest row.

    Exact (no positional encoding) and needed only when holes left by speculation fill the cache.
    """
    attention = [i for i, kind in enumerate(kinds) if kind == "attention"]
    if not attention:
        return cache
    valid = cache["layers"][attention[0]]["valid"]
    order = jnp.argsort(~valid, axis=1, stable=True)
    layers = list(cache["layers"])
    for i in attention:
        layer = layers[i]
        layers[i] = {
            "k": jnp.take_along_axis(layer["k"], order[:, None, :, None], axis=2),
            "v": jnp.take_along_axis(layer["v"], order[:, None, :, None], axis=2),
            "valid": jnp.take_along_axis(layer["valid"], order, axis=1),
        }
    index = jnp.max(jnp.sum(valid, axis=1)).astype(cache["index"].dtype)
    return dict(cache, layers=tuple(layers), index=index)


def compact_if_needed(cache: Cache, kinds: Sequence[str], room: int) -> Cache:
    """Compact when fewer than `room` slots remain after the write index."""
    max_len = _max_len(cache, kinds)
    if max_len is None:
        return cache
    return jax.lax.cond(cache["index"] + room > max_len, lambda c: compact(c, kinds), lambda c: c, cache)


def _max_len(cache: Cache, kinds: Sequence[str]) -> int | None:
    for layer, kind in zip(cache["layers"], kinds, strict=True):
        if kind == "attention":
            return layer["valid"].shape[1]
    return None
