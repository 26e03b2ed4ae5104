"""Packed sequences: several documents in one row, kept apart (fine-tuning on packed chats).

Every `valid` argument of the model takes either a bool mask [b, t] (False = padding) or integer
document ids [b, t] (0 = padding). With ids, a new document starts wherever a position's id differs
from the previous position's: attention never crosses a start, and the Mamba conv and SSM states
restart there, so a packed row computes exactly what its documents compute one by one. Position 0
continues whatever the cache holds (a document split over chunks); without a cache it starts clean.

Internally a row's documents are numbered 0, 1, 2, ... in order (`document_index`): numbers that
only grow, so "same document" between two positions is "same number", in a chunk or across chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def is_packed(valid_bt: jax.Array | None) -> bool:
    """Whether `valid` holds document ids (integers) rather than a padding mask (bool) or nothing."""
    return valid_bt is not None and jnp.issubdtype(jnp.asarray(valid_bt).dtype, jnp.integer)


def document_index(ids_bt: jax.Array) -> jax.Array:
    """int32 [b, t]: 0 for the document at position 0, one more at every position whose id changes."""
    starts = jnp.concatenate([jnp.zeros_like(ids_bt[:, :1], bool), ids_bt[:, 1:] != ids_bt[:, :-1]], axis=1)
    return jnp.cumsum(starts, axis=1, dtype=jnp.int32)


def split_valid(valid_bt: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
    """(padding mask bool [b, t] or None, document index [b, t] or None) of a model's `valid` argument."""
    if not is_packed(valid_bt):
        return valid_bt, None
    return valid_bt != 0, document_index(valid_bt)


def key_documents(doc_bt: jax.Array, cache_len: int, index: jax.Array | int) -> jax.Array:
    """Document index [b, s] of every entry of a KV cache that this step writes at `index` onwards.

    Entries before `index` belong to document 0 (the one position 0 continues); entries past this
    step's are hidden by causality whatever they hold. `index` is a scalar or one position per row.
    """
    b, t = doc_bt.shape
    positions = jnp.broadcast_to(jnp.asarray(index), (b,))[:, None] + jnp.arange(t)[None, :]
    return jnp.zeros((b, cache_len), jnp.int32).at[jnp.arange(b)[:, None], positions].set(doc_bt, mode="drop")


def with_prefix(doc_bt: jax.Array, width: int) -> jax.Array:
    """[b, width + t]: `width` positions of document 0 (a cached prefix) before the row's own."""
    return jnp.concatenate([jnp.zeros((doc_bt.shape[0], width), doc_bt.dtype), doc_bt], axis=1)
