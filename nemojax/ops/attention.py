"""Grouped-query attention under a boolean mask, pure-JAX reference (softmax in fp32).

Nemotron-H attention has no positional encoding, so the mask alone carries causality and padding.
Long inputs go over the keys in blocks with a running (online) softmax and a matching backward that
recomputes each block's probabilities from the saved row log-sum-exp (the FlashAttention scheme):
neither pass keeps a [t, s] score matrix, and a causal mask is built per key block from the keys'
validity and positions (the model's case), and, for packed documents, from the queries' and keys'
document numbers (a query sees only keys of its own document). So training memory grows with t, not
t·s, packed or not, and on CPU it is about 2x faster than one block for prefill and training lengths
(t >= 256).

The forward visits only the key blocks up to the last position a query can see (the causal bound
max(query_offset) + t): a prefill chunk skips the cache after it, and a decoding step against a long
cache costs O(current length), not O(capacity). Blocks are sliced from the keys in place (no copy of
the whole cache per step). Few queries (decoding, speculative verification, short prefill chunks) use
blocks of FEW_QUERY_KEY_BLOCK keys once the keys outgrow one such block, so no score matrix is larger
than t x max(KEY_BLOCK, FEW_QUERY_KEY_BLOCK): the memory of a prefill chunk is set by the chunk, not by
the prompt.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KEY_BLOCK = 256
MIN_QUERIES_FOR_BLOCKS = 256
FEW_QUERY_KEY_BLOCK = 1024
_F32 = jnp.float32


def gqa_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bts: jax.Array | None = None,
                  key_block: int | None = None, *, causal_valid_bs: jax.Array | None = None,
                  query_offset: jax.Array | int = 0, query_doc_bt: jax.Array | None = None,
                  key_doc_bs: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(d) masked) v, with kv heads shared by groups of query heads.

    q: [b, t, heads, d]; k, v: [b, s, kv_heads, d]. The mask is either explicit, `mask_bts` [b, t, s]
    (True = may attend), or causal: `causal_valid_bs` [b, s] (key validity) and `query_offset` (the
    absolute position of query 0; a scalar or one per row [b]): query i sees the valid keys at positions
    <= offset + i, and the mask is built one key block at a time, so no [b, t, s] array is kept (nor
    saved for the backward). With packed documents the causal form also takes the document numbers of
    the queries `query_doc_bt` [b, t] and of the keys `key_doc_bs` [b, s] (ints, see
    `nemojax.model.documents`): a query sees a key only when their numbers are equal.
    A query row whose mask is all False returns zeros. Returns [b, t, heads, d] in q's dtype.
    `key_block`: keys per block (None: `default_key_block(t, s)`; one block of all keys is differentiated
    by plain autodiff).
    """
    b, t, h, d = q_bthd.shape
    s, kv = k_bskd.shape[1], k_bskd.shape[2]
    if key_block is None:
        key_block = default_key_block(t, s)
    mask = _Mask(mask_bts, causal_valid_bs, jnp.asarray(query_offset, jnp.int32), query_doc_bt, key_doc_bs)
    q = q_bthd.reshape(b, t, kv, h // kv, d)
    if key_block >= s:
        out, _ = _finish(*_add_block(_empty_rows(q), q, k_bskd, v_bskd, mask.dense(t)))
    else:
        out = _blocked_attention(q, k_bskd, v_bskd, mask, key_block)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, h, d).astype(q_bthd.dtype)


def default_key_block(t: int, s: int) -> int:
    """Keys per block for t queries and s keys: KEY_BLOCK from MIN_QUERIES_FOR_BLOCKS queries on, else
    FEW_QUERY_KEY_BLOCK; all s keys at once when they fit in one block."""
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

    def blocks(self, t: int, key_block: int) -> tuple[Any, ...]:
        """Per key block ([n, ...] leading), what `block_mask` needs (padded keys are masked out)."""
        if self.explicit_bts is not None:
            b, _, s = self.explicit_bts.shape
            n = -(-s // key_block)
            m = jnp.pad(self.explicit_bts, ((0, 0), (0, 0), (0, n * key_block - s)))
            return (m.reshape(b, t, n, key_block).transpose(2, 0, 1, 3),)
        b, s = self.valid_bs.shape
        n = -(-s // key_block)

        def per_block(x_bs: jax.Array) -> jax.Array:  # [b, s] -> [n, b, key_block], padded keys invalid
            return jnp.pad(x_bs, ((0, 0), (0, n * key_block - s))).reshape(b, n, key_block).swapaxes(0, 1)

        key_doc = None if self.key_doc_bs is None else per_block(self.key_doc_bs)
        return per_block(self.valid_bs), jnp.arange(n * key_block).reshape(n, key_block), key_doc

    def block_mask(self, t: int, block: tuple[Any, ...]) -> jax.Array:
        """The [b, t, key_block] mask of one block from its `blocks` entry."""
        if self.explicit_bts is not None:
            return block[0]
        valid_bk, key_pos_k, key_doc_bk = block
        return self._causal(t, key_pos_k, valid_bk, key_doc_bk)

    def _causal(self, t: int, key_pos_k: jax.Array, valid_bk: jax.Array, key_doc_bk: jax.Array | None) -> jax.Array:
        """[b, t, k]: valid keys at positions <= the query's (`query_offset` a scalar or one per row), of
        the query's document when documents are given."""
        offset_b = jnp.broadcast_to(self.query_offset, valid_bk.shape[:1])
        q_pos_bt = jnp.arange(t)[None, :] + offset_b[:, None]
        mask = (key_pos_k[None, None, :] <= q_pos_bt[:, :, None]) & valid_bk[:, None, :]
        if key_doc_bk is not None:
            mask = mask & (self.query_doc_bt[:, :, None] == key_doc_bk[:, None, :])
        return mask

    def live_blocks(self, t: int, s: int, key_block: int) -> jax.Array:
        """How many leading key blocks hold a key some query may see (the rest are skipped)."""
        if self.explicit_bts is not None:
            seen_s = jnp.any(self.explicit_bts, axis=(0, 1))
            last = jnp.max(jnp.where(seen_s, jnp.arange(1, s + 1), 0))
        else:
            last = jnp.clip(jnp.max(self.query_offset) + t, 0, s)
        return (last + key_block - 1) // key_block

    def window(self, t: int, start: jax.Array, first: jax.Array, key_block: int) -> jax.Array:
        """The [b, t, key_block] mask of keys start .. start+key_block-1, only those at positions >= `first`
        (a last block slid back to end at s must not count earlier keys twice)."""
        key_pos_k = start + jnp.arange(key_block)
        new_k = key_pos_k >= first
        if self.explicit_bts is not None:
            return jax.lax.dynamic_slice_in_dim(self.explicit_bts, start, key_block, axis=2) & new_k
        valid_bk = jax.lax.dynamic_slice_in_dim(self.valid_bs, start, key_block, axis=1) & new_k
        key_doc_bk = (None if self.key_doc_bs is None
                      else jax.lax.dynamic_slice_in_dim(self.key_doc_bs, start, key_block, axis=1))
        return self._causal(t, key_pos_k, valid_bk, key_doc_bk)


def _empty_rows(q_btkrd: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, t, kv, r, d = q_btkrd.shape
    rows = (b, kv, r, t)
    return jnp.zeros(rows + (d,), _F32), jnp.full(rows, -jnp.inf, _F32), jnp.zeros(rows, _F32)


def _scores(q_btkrd, k_bskd, mask_bts) -> jax.Array:
    """Scaled, masked scores [b,k,r,t,s] in float32 (-inf where the mask is False)."""
    scores = jnp.einsum("btkrd,bskd->bkrts", q_btkrd, k_bskd, preferred_element_type=_F32)
    return jnp.where(mask_bts[:, None, None], scores * (q_btkrd.shape[-1] ** -0.5), -jnp.inf)


def _add_block(carry, q_btkrd, k_bskd, v_bskd, mask_bts):
    """Fold one block of keys into the running (unnormalised output, row max, row sum)."""
    acc_bkrtd, peak_bkrt, total_bkrt = carry
    scores = _scores(q_btkrd, k_bskd, mask_bts)
    new_peak = jnp.maximum(peak_bkrt, jnp.max(scores, axis=-1))
    shift = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)  # a row with nothing visible yet stays 0
    rescale = jnp.exp(peak_bkrt - shift)
    weights = jnp.exp(scores - shift[..., None])  # masked keys: exp(-inf) = 0
    acc_bkrtd = acc_bkrtd * rescale[..., None] + jnp.einsum(
        "bkrts,bskd->bkrtd", weights.astype(v_bskd.dtype), v_bskd, preferred_element_type=_F32)
    return acc_bkrtd, new_peak, total_bkrt * rescale + jnp.sum(weights, axis=-1)


def _finish(acc_bkrtd, peak_bkrt, total_bkrt) -> tuple[jax.Array, jax.Array]:
    """(out [b,k,r,t,d] f32, row log-sum-exp [b,k,r,t]; -inf for a row that sees no key)."""
    out = acc_bkrtd / jnp.maximum(total_bkrt, 1e-30)[..., None]  # normalise [t, d], not [t, s]
    lse = jnp.where(total_bkrt > 0, peak_bkrt + jnp.log(jnp.maximum(total_bkrt, 1e-30)), -jnp.inf)
    return out, lse


def _key_blocks(k_bskd, v_bskd, key_block: int):
    """Keys and values split into [n, ...] blocks (zero-padded to whole blocks)."""
    b, s, kv, d = k_bskd.shape
    blocks = -(-s // key_block)
    pad = blocks * key_block - s
    if pad:
        k_bskd, v_bskd = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k_bskd, v_bskd))
    k_nbskd = k_bskd.reshape(b, blocks, key_block, kv, d).swapaxes(0, 1)
    v_nbskd = v_bskd.reshape(b, blocks, key_block, kv, d).swapaxes(0, 1)
    return k_nbskd, v_nbskd


def _unblock(x_nbskd: jax.Array, s: int) -> jax.Array:
    n, b, block = x_nbskd.shape[:3]
    return x_nbskd.swapaxes(0, 1).reshape((b, n * block) + x_nbskd.shape[3:])[:, :s]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_attention(q_btkrd, k_bskd, v_bskd, mask: _Mask, key_block: int) -> jax.Array:
    return _blocked_forward(q_btkrd, k_bskd, v_bskd, mask, key_block)[0]


def _blocked_forward(q_btkrd, k_bskd, v_bskd, mask: _Mask, key_block: int):
    """The running softmax over the live key blocks (`_Mask.live_blocks`), each sliced in place; the last
    block of a length that blocks do not divide slides back to end at s, its repeated keys masked."""
    t, s = q_btkrd.shape[1], k_bskd.shape[1]

    def step(i, carry):
        first = i * key_block
        start = jnp.minimum(first, s - key_block)
        k, v = (jax.lax.dynamic_slice_in_dim(a, start, key_block, axis=1) for a in (k_bskd, v_bskd))
        return _add_block(carry, q_btkrd, k, v, mask.window(t, start, first, key_block))

    carry = jax.lax.fori_loop(0, mask.live_blocks(t, s, key_block), step, _empty_rows(q_btkrd))
    out, lse = _finish(*carry)
    return out, (q_btkrd, k_bskd, v_bskd, mask, out, lse)


def _blocked_backward(key_block: int, residuals, g_bkrtd):
    """Gradients block by block, the probabilities (and masks) recomputed from the row log-sum-exp."""
    q_btkrd, k_bskd, v_bskd, mask, out, lse = residuals
    t = q_btkrd.shape[1]
    scale = q_btkrd.shape[-1] ** -0.5
    g = g_bkrtd.astype(_F32)
    delta_bkrt = jnp.sum(g * out, axis=-1)  # sum_s p * dp = g . out
    safe_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    q32 = q_btkrd.astype(_F32)

    def step(dq_btkrd, block):
        k, v, mask_block = block
        probs = jnp.exp(_scores(q_btkrd, k, mask.block_mask(t, mask_block)) - safe_lse[..., None])  # masked: 0
        dv = jnp.einsum("bkrts,bkrtd->bskd", probs, g)
        dprobs = jnp.einsum("bkrtd,bskd->bkrts", g, v.astype(_F32))
        dscores = probs * (dprobs - delta_bkrt[..., None]) * scale
        dq_btkrd = dq_btkrd + jnp.einsum("bkrts,bskd->btkrd", dscores, k.astype(_F32))
        dk = jnp.einsum("bkrts,btkrd->bskd", dscores, q32)
        return dq_btkrd, (dk, dv)

    blocks = (*_key_blocks(k_bskd, v_bskd, key_block), mask.blocks(t, key_block))
    dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q_btkrd.shape, _F32), blocks)
    s = k_bskd.shape[1]
    mask_cotangent = jax.tree.map(_no_cotangent, mask)
    return (dq.astype(q_btkrd.dtype), _unblock(dk, s).astype(k_bskd.dtype), _unblock(dv, s).astype(v_bskd.dtype),
            mask_cotangent)


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
