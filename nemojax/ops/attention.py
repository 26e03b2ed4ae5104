"""Grouped-query attention with an explicit boolean mask, pure-JAX reference (softmax in fp32).

Nemotron-H attention has no positional encoding, so the mask alone carries causality and padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gqa_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bts: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d) masked) v, with kv heads shared by groups of query heads.

    q: [b, t, heads, d]; k, v: [b, s, kv_heads, d]; mask: [b, t, s] (True = may attend).
    A query row whose mask is all False returns zeros. Returns [b, t, heads, d] in q's dtype.
    """
    b, t, h, d = q_bthd.shape
    kv = k_bskd.shape[2]
    q = q_bthd.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkrd,bskd->bkrts", q, k_bskd, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    mask = mask_bts[:, None, None, :, :]
    scores = jnp.where(mask, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    weights = jnp.where(mask, jnp.exp(scores - peak), 0.0)
    weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)
    out = jnp.einsum("bkrts,bskd->btkrd", weights.astype(v_bskd.dtype), v_bskd)
    return out.reshape(b, t, h, d).astype(q_bthd.dtype)


def causal_mask(valid_bs: jax.Array, query_offset: jax.Array | int, t: int) -> jax.Array:
    """Mask [b, t, s]: query i (absolute position offset+i) sees valid keys at positions <= its own."""
    s = valid_bs.shape[1]
    q_pos = jnp.arange(t)[:, None] + query_offset
    k_pos = jnp.arange(s)[None, :]
    return (k_pos <= q_pos)[None] & valid_bs[:, None, :]
