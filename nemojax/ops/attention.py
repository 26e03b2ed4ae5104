"""Grouped-query attention with an explicit boolean mask, pure-JAX reference (softmax in fp32).

Nemotron-H attention has no positional encoding, so the mask alone carries causality and padding.
Long inputs go over the keys in blocks with a running (online) softmax: the same result without the
full [t, s] score matrix, which on CPU is about 2x faster for prefill and training lengths (t >= 256);
decoding steps (few queries) take the one-block path, which is faster there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KEY_BLOCK = 256
MIN_QUERIES_FOR_BLOCKS = 256


def gqa_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bts: jax.Array,
                  key_block: int | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(d) masked) v, with kv heads shared by groups of query heads.

    q: [b, t, heads, d]; k, v: [b, s, kv_heads, d]; mask: [b, t, s] (True = may attend).
    A query row whose mask is all False returns zeros. Returns [b, t, heads, d] in q's dtype.
    `key_block`: keys per block (None: KEY_BLOCK when t >= MIN_QUERIES_FOR_BLOCKS and s > KEY_BLOCK,
    else all keys at once).
    """
    b, t, h, d = q_bthd.shape
    s, kv = k_bskd.shape[1], k_bskd.shape[2]
    if key_block is None:
        key_block = KEY_BLOCK if t >= MIN_QUERIES_FOR_BLOCKS and s > KEY_BLOCK else s
    blocks = -(-s // key_block)
    pad = blocks * key_block - s
    if pad:  # padded keys are masked out
        k_bskd, v_bskd = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k_bskd, v_bskd))
        mask_bts = jnp.pad(mask_bts, ((0, 0), (0, 0), (0, pad)))
    q = q_bthd.reshape(b, t, kv, h // kv, d)
    k_nbskd = k_bskd.reshape(b, blocks, key_block, kv, d).swapaxes(0, 1)
    v_nbskd = v_bskd.reshape(b, blocks, key_block, kv, d).swapaxes(0, 1)
    mask_nbts = mask_bts.reshape(b, t, blocks, key_block).transpose(2, 0, 1, 3)

    def add_block(carry, block):
        acc_bkrtd, peak_bkrt, total_bkrt = carry
        k, v, mask = block
        scores = jnp.einsum("btkrd,bskd->bkrts", q, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, None], scores * (d ** -0.5), -jnp.inf)
        new_peak = jnp.maximum(peak_bkrt, jnp.max(scores, axis=-1))
        shift = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)  # a row with nothing visible yet stays 0
        rescale = jnp.exp(peak_bkrt - shift)
        weights = jnp.exp(scores - shift[..., None])  # masked keys: exp(-inf) = 0
        acc_bkrtd = acc_bkrtd * rescale[..., None] + jnp.einsum(
            "bkrts,bskd->bkrtd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return (acc_bkrtd, new_peak, total_bkrt * rescale + jnp.sum(weights, axis=-1)), None

    rows = (b, kv, h // kv, t)
    carry = (jnp.zeros(rows + (d,), jnp.float32), jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32))
    if blocks == 1:
        carry, _ = add_block(carry, (k_nbskd[0], v_nbskd[0], mask_nbts[0]))
    else:
        carry, _ = jax.lax.scan(add_block, carry, (k_nbskd, v_nbskd, mask_nbts))
    acc_bkrtd, _, total_bkrt = carry
    out = acc_bkrtd / jnp.maximum(total_bkrt, 1e-30)[..., None]  # normalise [t, d], not [t, s]
    return jnp.moveaxis(out, 3, 1).reshape(b, t, h, d).astype(q_bthd.dtype)


def causal_mask(valid_bs: jax.Array, query_offset: jax.Array | int, t: int) -> jax.Array:
    """Mask [b, t, s]: query i (absolute position offset+i) sees valid keys at positions <= its own."""
    s = valid_bs.shape[1]
    q_pos = jnp.arange(t)[:, None] + query_offset
    k_pos = jnp.arange(s)[None, :]
    return (k_pos <= q_pos)[None] & valid_bs[:, None, :]
