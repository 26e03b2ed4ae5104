"""Grouped-query self-attention with no positional encoding (Nemotron-H `*` layers).

Cache (decoding): {"k", "v": [b, kv_heads, max_len, head_dim], "valid": [b, max_len] bool}, kv-head-major
so that a decoding step reads it in place (`nemojax.ops.attention.gqa_attention_kv_major`). Every row
has its own write position (`index`, [b]): entry j of row b holds the key of position j of that row's
sequence, so rows of one batch can be at different lengths (continuous batching). A query at position
p of row b sees the valid entries at positions <= p: with no positional encoding, the mask is all
that places a key. Entries at or beyond a row's index are left over from rolled-back drafts or an
earlier occupant of the row; causality hides them until they are overwritten. With scanned layers
the caches of all attention layers are stacked ([layers, b, ...]) and a layer is given the stack and
its `slot`: it writes only its new entries into the stack (no copy of the stack per layer). Given
document ids instead of a padding mask (`nemojax.model.documents`), a query sees only keys of its own
document: the document test is part of the per-key-block causal mask (`gqa_attention`), never a
[b, t, s] array in training.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax import sharding
from nemojax.config import ModelConfig
from nemojax.model import documents
from nemojax.model.layers import Linear, default_init, dtype_of, scale_param
from nemojax.ops.attention import gqa_attention, gqa_attention_kv_major
from nemojax.quant import kv_cache

KVCache = dict[str, jax.Array]


def init_kv_cache(config: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype) -> KVCache:
    """Empty K/V entries in `config.kv_cache_dtype` (None: `dtype`) and their validity."""
    dtype = jnp.dtype(config.kv_cache_dtype or dtype)
    shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_len), bool)}


def write_kv_cache(cache: KVCache, k_btkd: jax.Array, v_btkd: jax.Array, valid_bt: jax.Array, index_b: jax.Array,
                   slot: jax.Array | int | None = None) -> tuple[KVCache, jax.Array, jax.Array, jax.Array]:
    """Write this step's keys, values and validity of row b at positions index_b[b] onwards.

    `slot` None: `cache` is this layer's own. Otherwise `cache` is stacked over layers and `slot` is this
    layer's row. Positions past the cache's end are dropped (never clamped onto earlier entries).
    Returns (new cache, this layer's keys [b, kv, s, d], values, validity [b, s]).
    """
    b, t = valid_bt.shape
    rows = jnp.arange(b)[:, None]
    positions = jnp.broadcast_to(index_b, (b,))[:, None] + jnp.arange(t)[None, :]
    valid_at = (rows, positions) if slot is None else (slot, rows, positions)
    # [.., b, kv, s, d] indexed at (rows, :, positions): the indexed [b, t] comes first, then kv, d
    kv_at = (rows, slice(None), positions) if slot is None else (slot, rows, slice(None), positions)
    new = {
        "k": cache["k"].at[kv_at].set(k_btkd.astype(cache["k"].dtype), mode="drop"),
        "v": cache["v"].at[kv_at].set(v_btkd.astype(cache["v"].dtype), mode="drop"),
        "valid": cache["valid"].at[valid_at].set(valid_bt, mode="drop"),
    }
    if slot is None:
        return new, new["k"], new["v"], new["valid"]
    row = {name: jax.lax.dynamic_index_in_dim(a, slot, 0, keepdims=False) for name, a in new.items()}
    return new, row["k"], row["v"], row["valid"]


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd: jax.Array, valid_bt: jax.Array | None = None, cache: KVCache | None = None,
                 index: jax.Array | int = 0, slot: jax.Array | int | None = None) -> tuple[jax.Array, KVCache | None]:
        c = self.config
        dtype, pdtype = dtype_of(c.compute_dtype), dtype_of(c.param_dtype)
        b, t, _ = x_btd.shape
        hd = c.head_dim
        k_scale = v_scale = 1.0  # an FP8 cache without the checkpoint's scales (nemojax.quant.kv_cache)
        if c.kv_cache_quant == "fp8":  # the checkpoint's FP8 KV-cache scales (used by an FP8 cache only)
            k_scale, v_scale = scale_param(self, "k_scale"), scale_param(self, "v_scale")
        q = Linear(c.num_attention_heads * hd, ("embed", "heads"), dtype, pdtype, config=c, name="q_proj")(x_btd)
        k = Linear(c.num_key_value_heads * hd, ("embed", "kv_heads"), dtype, pdtype, config=c, name="k_proj")(x_btd)
        v = Linear(c.num_key_value_heads * hd, ("embed", "kv_heads"), dtype, pdtype, config=c, name="v_proj")(x_btd)
        q = q.reshape(b, t, c.num_attention_heads, hd)
        k = k.reshape(b, t, c.num_key_value_heads, hd)
        v = v.reshape(b, t, c.num_key_value_heads, hd)
        q = sharding.constrain(q, ("batch", "length", "act_heads", None))
        k, v = (sharding.constrain(a, ("batch", "length", "act_kv_heads", None)) for a in (k, v))
        valid_bt, doc_bt = documents.split_valid(valid_bt)
        valid = jnp.ones((b, t), bool) if valid_bt is None else valid_bt.astype(bool)

        key_doc = doc_bt  # the document number of every key: this step's, or the cache's entries
        if cache is None:
            new_cache, offset = None, 0
        else:
            stored = cache["k"].dtype
            new_cache, k, v, valid = write_kv_cache(cache, kv_cache.to_cache(k, k_scale, stored),
                                                    kv_cache.to_cache(v, v_scale, stored), valid, index, slot)
            k, v, offset = kv_cache.from_cache(k, k_scale, dtype), kv_cache.from_cache(v, v_scale, dtype), index
            if doc_bt is not None:
                key_doc = documents.key_documents(doc_bt, valid.shape[1], index)
        attend = gqa_attention if cache is None else gqa_attention_kv_major  # the cache is kv-head-major
        out = attend(q, k, v, causal_valid_bs=valid, query_offset=offset, query_doc_bt=doc_bt, key_doc_bs=key_doc)
        out = sharding.constrain(out, ("batch", "length", "act_heads", None))
        out_init = default_init(0.02 / math.sqrt(2 * c.num_layers))
        out = Linear(c.hidden_size, ("heads", "embed"), dtype, pdtype, out_init, config=c, name="o_proj")(
            out.reshape(b, t, c.num_attention_heads * hd))
        return out, new_cache
