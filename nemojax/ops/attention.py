"""Grouped-query attention under a boolean mask, pure-JAX reference (softmax in fp32).

Nemotron-H attention has no positional encoding, so the mask alone carries causality and padding.
Long inputs go over the keys in blocks with a running (online) softmax and a matching backward that
recomputes each block's probabilities from the saved row log-sum-exp (the FlashAttention scheme):
neither pass keeps a [t, s] score matrix, and a causal mask is built per key block from the keys'
validity and positions (the model's case), and, for packed documents, from the queries' and keys'
document numbers (a query sees only keys of its own document). So training memory grows with t, not
t·s, packed or not, and on CPU it is about 2x faster than one block for prefill and training lengths
(t >= 256). Blocks whose keys are all masked (a decoding cache beyond the write index) are skipped:
the forward visits the key blocks only up to the last one a query can see, so a prefill chunk does not
read the cache after it and a decoding step against a long cache costs O(current length), not
O(capacity). Few queries (decoding, speculative verification, prefill chunks under
MIN_QUERIES_FOR_BLOCKS) use blocks of FEW_QUERY_KEY_BLOCK keys once the keys outgrow one such block, so
no score matrix is larger than t x max(KEY_BLOCK, FEW_QUERY_KEY_BLOCK): the memory of a prefill chunk
is set by the chunk, not by the prompt.

Keys and values are taken kv-head-major ([b, kv_heads, s, d], `gqa_attention_kv_major`): the layout
of the decoding cache, read in place (with [b, s, kv_heads, d] every decoding step would first copy
the whole cache into that order). With at most FEW_QUERIES queries (decoding, speculative
verification) the scores are computed keys-first ([s, d] keys times the few [d] queries): the keys,
the big operand, are then read in their stored order, where queries-first reads them transposed
(measured on CPU against products summed over one axis, the earlier form: a little slower at batch 1,
faster from batch 2 on, no copy of the cache; bench/results/decode_scaling.md).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KEY_BLOCK = 256
MIN_QUERIES_FOR_BLOCKS = 256
FEW_QUERIES = 8
FEW_QUERY_KEY_BLOCK = 1024
_F32 = jnp.float32


def gqa_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bts: jax.Array | None = None,
                  key_block: int | None = None, *, causal_valid_bs: jax.Array | None = None,
                  query_offset: jax.Array | int = 0, query_doc_bt: jax.Array | None = None,
                  key_doc_bs: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(d) masked) v, with kv heads shared by groups of query heads.

    q: [b, t, heads, d]; k, v: [b, s, kv_heads, d]. The mask is either explicit, `mask_bts` [b, t, s]
    (True = may attend), or causal: `causal_valid_bs` [b, s] (key validity) and `query_offset` (the
    absolute position of query 0, a scalar or one per row [b]): query i sees the valid keys at positions
    <= offset + i, and the mask is built one key block at a time, so no [b, t, s] array is kept (nor
    saved for the backward). With packed documents the causal form also takes the document numbers of
    the queries `query_doc_bt` [b, t] and of the keys `key_doc_bs` [b, s] (ints, see
    `nemojax.model.documents`): a query sees a key only when their numbers are equal.
    A query row whose mask is all False returns zeros. Returns [b, t, heads, d] in q's dtype.
    `key_block`: keys per block (None: `default_key_block(t, s)`; one block of all keys is differentiated
    by plain autodiff).
    """
    return gqa_attention_kv_major(q_bthd, jnp.swapaxes(k_bskd, 1, 2), jnp.swapaxes(v_bskd, 1, 2), mask_bts,
                                  key_block, causal_valid_bs=causal_valid_bs, query_offset=query_offset,
                                  query_doc_bt=query_doc_bt, key_doc_bs=key_doc_bs)


def gqa_attention_kv_major(q_bthd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array, mask_bts: jax.Array | None = None,
                           key_block: int | None = None, *, causal_valid_bs: jax.Array | None = None,
                           query_offset: jax.Array | int = 0, query_doc_bt: jax.Array | None = None,
                           key_doc_bs: jax.Array | None = None) -> jax.Array:
    """`gqa_attention` with keys and values laid out [b, kv_heads, s, d] (the decoding cache's layout)."""
    b, t, h, d = q_bthd.shape
    kv, s = k_bksd.shape[1], k_bksd.shape[2]
    if key_block is None:
        key_block = default_key_block(t, s)
    mask = _Mask(mask_bts, causal_valid_bs, jnp.asarray(query_offset, jnp.int32), query_doc_bt, key_doc_bs)
    q = jnp.moveaxis(q_bthd.reshape(b, t, kv, h // kv, d), 1, 3)  # [b, kv, r, t, d]
    if key_block >= s:
        out, _ = _finish(*_add_block(_empty_rows(q), q, k_bksd, v_bksd, mask.dense(t)))
    else:
        out = _blocked_attention(q, k_bksd, v_bksd, mask, key_block)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, h, d).astype(q_bthd.dtype)


def default_key_block(t: int, s: int) -> int:
    """Keys per block for t queries and s keys: KEY_BLOCK from MIN_QUERIES_FOR_BLOCKS queries on, else
    FEW_QUERY_KEY_BLOCK; all s keys at once when they fit in one block. The forward needs no block to
    divide s (its last block slides back)."""
    block = KEY_BLOCK if t >= MIN_QUERIES_FOR_BLOCKS else FEW_QUERY_KEY_BLOCK
    return s if s <= block else block


class _Mask(NamedTuple):
    """An explicit [b, t, s] mask, or the causal one described by key validity and the query offset
    (and, for packed documents, the queries' and keys' document numbers)."""

    explicit_bts: jax.Array | None
    valid_bs: jax.Array | None
    query_offset: jax.Array
    query_doc_bt: jax.Array | None = None
    key_doc_bs: jax.Array | None = None

    def dense(self, t: int) -> jax.Array:
        if self.explicit_bts is not None:
            return self.explicit_bts
        mask = causal_mask(self.valid_bs, self.query_offset, t)
        if self.key_doc_bs is not None:
            mask = mask & (self.query_doc_bt[:, :, None] == self.key_doc_bs[:, None, :])
        return mask

    def padded(self, s: int) -> _Mask:
        """The mask over `s` keys (padded keys are masked out)."""
        if self.explicit_bts is not None:
            pad = s - self.explicit_bts.shape[2]
            return self._replace(explicit_bts=jnp.pad(self.explicit_bts, ((0, 0), (0, 0), (0, pad))))
        pad = ((0, 0), (0, s - self.valid_bs.shape[1]))  # padded keys are invalid
        key_doc = None if self.key_doc_bs is None else jnp.pad(self.key_doc_bs, pad)
        return self._replace(valid_bs=jnp.pad(self.valid_bs, pad), key_doc_bs=key_doc)

    def block_at(self, start: jax.Array, key_block: int) -> tuple[Any, ...]:
        """What `block_mask` needs for the `key_block` keys from position `start` on."""
        if self.explicit_bts is not None:
            return (jax.lax.dynamic_slice_in_dim(self.explicit_bts, start, key_block, axis=2),)
        valid, key_doc = (None if x is None else jax.lax.dynamic_slice_in_dim(x, start, key_block, axis=1)
                          for x in (self.valid_bs, self.key_doc_bs))
        return valid, start + jnp.arange(key_block), key_doc

    def blocks(self, t: int, key_block: int) -> tuple[Any, ...]:
        """Per key block ([n, ...] leading), what `block_mask` needs (padded keys are masked out)."""
        if self.explicit_bts is not None:
            b, _, s = self.explicit_bts.shape
            n = -(-s // key_block)
            m = self.padded(n * key_block).explicit_bts
            return (m.reshape(b, t, n, key_block).transpose(2, 0, 1, 3),)
        b, s = self.valid_bs.shape
        n = -(-s // key_block)
        padded = self.padded(n * key_block)

        def per_block(x_bs: jax.Array | None) -> jax.Array | None:  # [b, s] -> [n, b, key_block]
            return None if x_bs is None else x_bs.reshape(b, n, key_block).swapaxes(0, 1)

        return (per_block(padded.valid_bs), jnp.arange(n * key_block).reshape(n, key_block),
                per_block(padded.key_doc_bs))

    def block_mask(self, t: int, block: tuple[Any, ...]) -> jax.Array:
        """The [b, t, key_block] mask of one block from its `blocks` entry."""
        if self.explicit_bts is not None:
            return block[0]
        valid_bk, key_pos_k, key_doc_bk = block
        q_pos = jnp.arange(t)[None, :, None] + self.query_offset.reshape(-1, 1, 1)  # offset: scalar or [b]
        mask = (key_pos_k[None, None, :] <= q_pos) & valid_bk[:, None, :]
        if key_doc_bk is not None:
            mask = mask & (self.query_doc_bt[:, :, None] == key_doc_bk[:, None, :])
        return mask

    def live_blocks(self, t: int, key_block: int) -> jax.Array:
        """How many key blocks to visit: up to the one holding the last visible key."""
        if self.explicit_bts is not None:
            seen_s = jnp.any(self.explicit_bts, axis=(0, 1))
        else:
            last_query = jnp.max(self.query_offset) + t - 1
            seen_s = jnp.any(self.valid_bs, axis=0) & (jnp.arange(self.valid_bs.shape[1]) <= last_query)
        n = -(-seen_s.shape[0] // key_block)
        seen_n = jnp.any(jnp.pad(seen_s, (0, n * key_block - seen_s.shape[0])).reshape(n, key_block), axis=1)
        return jnp.max(jnp.where(seen_n, jnp.arange(1, n + 1), 0))


def _empty_rows(q_bkrtd: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, kv, r, t, d = q_bkrtd.shape
    rows = (b, kv, r, t)
    return jnp.zeros(rows + (d,), _F32), jnp.full(rows, -jnp.inf, _F32), jnp.zeros(rows, _F32)


def _scores(q_bkrtd, k_bksd, mask_bts) -> jax.Array:
    """Scaled, masked scores [b,k,r,t,s] in float32 (-inf where the mask is False)."""
    if q_bkrtd.shape[3] <= FEW_QUERIES:
        scores = jnp.moveaxis(jnp.einsum("bksd,bkrtd->bksrt", k_bksd, q_bkrtd, preferred_element_type=_F32), 2, -1)
    else:
        scores = jnp.einsum("bkrtd,bksd->bkrts", q_bkrtd, k_bksd, preferred_element_type=_F32)
    return jnp.where(mask_bts[:, None, None], scores * (q_bkrtd.shape[-1] ** -0.5), -jnp.inf)


def _add_block(carry, q_bkrtd, k_bksd, v_bksd, mask_bts):
    """Fold one block of keys into the running (unnormalised output, row max, row sum)."""
    acc_bkrtd, peak_bkrt, total_bkrt = carry
    scores = _scores(q_bkrtd, k_bksd, mask_bts)
    new_peak = jnp.maximum(peak_bkrt, jnp.max(scores, axis=-1))
    shift = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)  # a row with nothing visible yet stays 0
    rescale = jnp.exp(peak_bkrt - shift)
    weights = jnp.exp(scores - shift[..., None])  # masked keys: exp(-inf) = 0
    if q_bkrtd.shape[3] <= FEW_QUERIES:  # float32 weights, as the products they replace
        values = jnp.einsum("bkrts,bksd->bkrtd", weights, v_bksd.astype(_F32))
    else:
        values = jnp.einsum("bkrts,bksd->bkrtd", weights.astype(v_bksd.dtype), v_bksd, preferred_element_type=_F32)
    acc_bkrtd = acc_bkrtd * rescale[..., None] + values
    return acc_bkrtd, new_peak, total_bkrt * rescale + jnp.sum(weights, axis=-1)


def _finish(acc_bkrtd, peak_bkrt, total_bkrt) -> tuple[jax.Array, jax.Array]:
    """(out [b,k,r,t,d] f32, row log-sum-exp [b,k,r,t]; -inf for a row that sees no key)."""
    out = acc_bkrtd / jnp.maximum(total_bkrt, 1e-30)[..., None]  # normalise [t, d], not [t, s]
    lse = jnp.where(total_bkrt > 0, peak_bkrt + jnp.log(jnp.maximum(total_bkrt, 1e-30)), -jnp.inf)
    return out, lse


def _padded_keys(k_bksd, v_bksd, key_block: int):
    """Keys and values with the key axis zero-padded to whole blocks."""
    pad = (-k_bksd.shape[2]) % key_block
    if pad:
        k_bksd, v_bksd = (jnp.pad(a, ((0, 0), (0, 0), (0, pad), (0, 0))) for a in (k_bksd, v_bksd))
    return k_bksd, v_bksd


def _key_blocks(k_bksd, v_bksd, key_block: int):
    """Keys and values split into [n, b, kv, block, d] blocks (zero-padded to whole blocks)."""
    k_bksd, v_bksd = _padded_keys(k_bksd, v_bksd, key_block)
    b, kv, s, d = k_bksd.shape
    blocks = s // key_block
    k_nbksd = jnp.moveaxis(k_bksd.reshape(b, kv, blocks, key_block, d), 2, 0)
    v_nbksd = jnp.moveaxis(v_bksd.reshape(b, kv, blocks, key_block, d), 2, 0)
    return k_nbksd, v_nbksd


def _unblock(x_nbksd: jax.Array, s: int) -> jax.Array:
    n, b, kv, block, d = x_nbksd.shape
    return jnp.moveaxis(x_nbksd, 0, 2).reshape(b, kv, n * block, d)[:, :, :s]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_attention(q_bkrtd, k_bksd, v_bksd, mask: _Mask, key_block: int) -> jax.Array:
    return _blocked_forward(q_bkrtd, k_bksd, v_bksd, mask, key_block)[0]


def _blocked_forward(q_bkrtd, k_bksd, v_bksd, mask: _Mask, key_block: int):
    """The running softmax over key blocks, stopping after the last block with a visible key (a decoding
    cache is mostly empty during prefill: its unwritten tail is never read). When the blocks do not divide
    the keys, the last block ends at the last key and skips the keys the block before it took: the keys
    are read in place, never padded (a padded copy of a decoding cache would cost O(capacity) per step)."""
    t, s = q_bkrtd.shape[3], k_bksd.shape[2]

    def step(i, carry):
        start = jnp.minimum(i * key_block, s - key_block)
        k, v = (jax.lax.dynamic_slice_in_dim(a, start, key_block, axis=2) for a in (k_bksd, v_bksd))
        fresh_k = start + jnp.arange(key_block) >= i * key_block  # not taken by the block before
        block_mask = mask.block_mask(t, mask.block_at(start, key_block)) & fresh_k
        return _add_block(carry, q_bkrtd, k, v, block_mask)

    out, lse = _finish(*jax.lax.fori_loop(0, mask.live_blocks(t, key_block), step, _empty_rows(q_bkrtd)))
    return out, (q_bkrtd, k_bksd, v_bksd, mask, out, lse)


def _blocked_backward(key_block: int, residuals, g_bkrtd):
    """Gradients block by block, the probabilities (and masks) recomputed from the row log-sum-exp."""
    q_bkrtd, k_bksd, v_bksd, mask, out, lse = residuals
    t = q_bkrtd.shape[3]
    scale = q_bkrtd.shape[-1] ** -0.5
    g = g_bkrtd.astype(_F32)
    delta_bkrt = jnp.sum(g * out, axis=-1)  # sum_s p * dp = g . out
    safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    q32 = q_bkrtd.astype(_F32)

    def step(dq_bkrtd, block):
        k, v, mask_block = block
        probs = jnp.exp(_scores(q_bkrtd, k, mask.block_mask(t, mask_block)) - safe_lse[..., None])  # masked: 0
        dv = jnp.einsum("bkrts,bkrtd->bksd", probs, g)
        dprobs = jnp.einsum("bkrtd,bksd->bkrts", g, v.astype(_F32))
        dscores = probs * (dprobs - delta_bkrt[..., None]) * scale
        dq_bkrtd = dq_bkrtd + jnp.einsum("bkrts,bksd->bkrtd", dscores, k.astype(_F32))
        dk = jnp.einsum("bkrts,bkrtd->bksd", dscores, q32)
        return dq_bkrtd, (dk, dv)

    blocks = (*_key_blocks(k_bksd, v_bksd, key_block), mask.blocks(t, key_block))
    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q_bkrtd.shape, _F32), blocks)
    s = k_bksd.shape[2]
    return (dq.astype(q_bkrtd.dtype), _unblock(dk, s).astype(k_bksd.dtype), _unblock(dv, s).astype(v_bksd.dtype),
            jax.tree.map(_no_cotangent, mask))


def _no_cotangent(x: jax.Array) -> np.ndarray:
    """The cotangent of a mask leaf (booleans, positions): float0 zeros."""
    return np.zeros(np.shape(x), jax.dtypes.float0)


_blocked_attention.defvjp(_blocked_forward, _blocked_backward)


def causal_mask(valid_bs: jax.Array, query_offset: jax.Array | int, t: int) -> jax.Array:
    """Mask [b, t, s]: query i of row b (absolute position offset+i; `query_offset` a scalar or one per
    row [b]) sees the valid keys at positions <= its own."""
    b, s = valid_bs.shape
    offset_b = jnp.broadcast_to(jnp.asarray(query_offset), (b,))
    q_pos = jnp.arange(t)[None, :, None] + offset_b[:, None, None]
    k_pos = jnp.arange(s)[None, None, :]
    return (k_pos <= q_pos) & valid_bs[:, None, :]
