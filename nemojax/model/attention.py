"""Grouped-query self-attention with no positional encoding (Nemotron-H `*` layers).

Cache (decoding): {"k", "v": [b, max_len, kv_heads, head_dim], "valid": [b, max_len] bool}; new
keys are written at `index` (shared by the batch: prompts are left-padded, and with no positional
encoding left padding is exact once padded keys are masked). With scanned layers the caches of all
attention layers are stacked ([layers, b, ...]) and a layer is given the stack and its `slot`: it
writes only its new entries into the stack (no copy of the stack per layer).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax import sharding
from nemojax.config import ModelConfig
from nemojax.model.layers import Linear, default_init, dtype_of, scale_param
from nemojax.ops.attention import gqa_attention

KVCache = dict[str, jax.Array]


def init_kv_cache(config: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype) -> KVCache:
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_len), bool)}


def write_kv_cache(cache: KVCache, k_btkd: jax.Array, v_btkd: jax.Array, valid_bt: jax.Array, index: jax.Array | int,
                   slot: jax.Array | int | None = None) -> tuple[KVCache, jax.Array, jax.Array, jax.Array]:
    """Write this step's keys, values and validity at position `index`.

    `slot` None: `cache` is this layer's own. Otherwise `cache` is stacked over layers and `slot` is this
    layer's row. Returns (new cache, this layer's keys [b, s, kv, d], values, validity [b, s]).
    """
    if slot is None:
        start = (0, index, 0, 0)
        new = {
            "k": jax.lax.dynamic_update_slice(cache["k"], k_btkd.astype(cache["k"].dtype), start),
            "v": jax.lax.dynamic_update_slice(cache["v"], v_btkd.astype(cache["v"].dtype), start),
            "valid": jax.lax.dynamic_update_slice(cache["valid"], valid_bt, (0, index)),
        }
        return new, new["k"], new["v"], new["valid"]
    start = (slot, 0, index, 0, 0)
    new = {
        "k": jax.lax.dynamic_update_slice(cache["k"], k_btkd[None].astype(cache["k"].dtype), start),
        "v": jax.lax.dynamic_update_slice(cache["v"], v_btkd[None].astype(cache["v"].dtype), start),
        "valid": jax.lax.dynamic_update_slice(cache["valid"], valid_bt[None], (slot, 0, index)),
    }
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
        if c.kv_cache_quant == "fp8":  # the checkpoint's FP8 KV-cache scales, kept (the cache stays in `dtype`)
            scale_param(self, "k_scale")
            scale_param(self, "v_scale")
        q = Linear(c.num_attention_heads * hd, ("embed", "heads"), dtype, pdtype, config=c, name="q_proj")(x_btd)
        k = Linear(c.num_key_value_heads * hd, ("embed", "kv_heads"), dtype, pdtype, config=c, name="k_proj")(x_btd)
        v = Linear(c.num_key_value_heads * hd, ("embed", "kv_heads"), dtype, pdtype, config=c, name="v_proj")(x_btd)
        q = q.reshape(b, t, c.num_attention_heads, hd)
        k = k.reshape(b, t, c.num_key_value_heads, hd)
        v = v.reshape(b, t, c.num_key_value_heads, hd)
        q = sharding.constrain(q, ("batch", "length", "act_heads", None))
        k, v = (sharding.constrain(a, ("batch", "length", "act_kv_heads", None)) for a in (k, v))
        valid = jnp.ones((b, t), bool) if valid_bt is None else valid_bt.astype(bool)

        if cache is None:
            new_cache, offset = None, 0
        else:
            new_cache, k, v, valid = write_kv_cache(cache, k, v, valid, index, slot)
            k, v, offset = k.astype(dtype), v.astype(dtype), index
        out = gqa_attention(q, k, v, causal_valid_bs=valid, query_offset=offset)
        out = sharding.constrain(out, ("batch", "length", "act_heads", None))
        out_init = default_init(0.02 / math.sqrt(2 * c.num_layers))
        out = Linear(c.hidden_size, ("heads", "embed"), dtype, pdtype, out_init, config=c, name="o_proj")(
            out.reshape(b, t, c.num_attention_heads * hd))
        return out, new_cache
