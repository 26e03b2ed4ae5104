"""Grouped-query attention under a boolean mask, pure-JAX reference (softmax in fp32).

Nemotron-H attention has no positional encoding, so the mask alone carries causality and padding.
Long inputs go over the keys in blocks with a running (online) softmax and a matching backward that
recomputes each block's probabilities from the saved row log-sum-exp (the FlashAttention scheme):
neither pass keeps a [t, s] score matrix, and a causal mask is built per key block from the keys'
validity and positions (the model's case), and, for packed documents, from the queries' and keys'
document numbers (a query sees only keys of its own document). So training memory grows with t, not
t·s, packed or not, and on CPU it is
about 2x faster than one block for prefill and training lengths (t >= 256). Decoding steps (few
queries) take the one-block path, which is faster there.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KEY_BLOCK = 256
MIN_QUERIES_FOR_BLOCKS = 256
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
    `key_block`: keys per block (None: KEY_BLOCK when t >= MIN_QUERIES_FOR_BLOCKS and s > KEY_BLOCK,
    else all keys at once, differentiated by plain autodiff).
    """
    b, t, h, d = q_bthd.shape
    s, kv = k_bskd.shape[1], k_bskd.shape[2]
    if key_block is None:
        key_block = KEY_BLOCK if t >= MIN_QUERIES_FOR_BLOCKS and s > KEY_BLOCK else s
    mask = _Mask(mask_bts, causal_valid_bs, jnp.asarray(query_offset, jnp.int32), query_doc_bt, key_doc_bs)
    q = q_bthd.reshape(b, t, kv, h // kv, d)
    if key_block >= s:
        out, _ = _finish(*_add_block(_empty_rows(q), q, k_bskd, v_bskd, mask.dense(t)))
    else:
        out = _blocked_attention(q, k_bskd, v_bskd, mask, key_block)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, h, d).astype(q_bthd.dtype)


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
        offset_b = jnp.broadcast_to(self.query_offset, valid_bk.shape[:1])
        q_pos_bt = jnp.arange(t)[None, :] + offset_b[:, None]
        mask = (key_pos_k[None, None, :] <= q_pos_bt[:, :, None]) & valid_bk[:, None, :]
        if key_doc_bk is not None:
            mask = mask & (self.query_doc_bt[:, :, None] == key_doc_bk[:, None, :])
        return mask


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
    t = q_btkrd.shape[1]

    def step(carry, block):
        k, v, mask_block = block
        return _add_block(carry, q_btkrd, k, v, mask.block_mask(t, mask_block)), None

    blocks = (*_key_blocks(k_bskd, v_bskd, key_block), mask.blocks(t, key_block))
    carry, _ = jax.lax.scan(step, _empty_rows(q_btkrd), blocks)
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
