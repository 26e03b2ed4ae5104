"""The Nemotron-H stack: embeddings, the hybrid layers in config order, final norm, lm_head, and
the optional MTP block.

`NemotronH.apply(variables, input_ids)` returns logits [b, t, vocab] (float32). Other entry points
(use with `method=`): `forward` (logits, final hidden state and caches), `hidden_states` (the same
without the lm_head), `mtp_forward` / `mtp_hidden` (the MTP block), `logits` (the lm_head).
`init_cache` builds empty decoding caches.

Caches are plain pytrees passed in and returned: {"index": int32 [b] (each row's next write position),
"layers": the main stack's caches, "mtp": the MTP block's caches ({"index", "layers"})}. "layers" is a
tuple with one entry per layer (None for MoE/MLP layers), or, with `config.scan_layers`, a dict of
caches stacked per layer kind ({"mamba": ..., "attention": ...}, see `nemojax.model.scanned`). The
MTP block is never scanned: its "layers" is always the per-layer tuple.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax import sharding
from nemojax.config import ModelConfig
from nemojax.model.attention import init_kv_cache
from nemojax.model.block import block_class
from nemojax.model.layers import Linear, RMSNorm, default_init, dtype_of, filled_length
from nemojax.model.mamba import init_mamba_cache
from nemojax.model.scanned import ScannedLayers
from nemojax.model.stacking import stacked_caches

Cache = dict[str, Any]


class Embedding(nn.Module):
    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.weight = self.param("weight", nn.with_logical_partitioning(default_init(), ("vocab", "embed")),
                                 (c.vocab_size, c.hidden_size), dtype_of(c.param_dtype))

    def __call__(self, ids_bt: jax.Array) -> jax.Array:
        # Gather from the table with its fsdp shards collected (as FSDP does for every weight).
        table = sharding.constrain(self.weight, ("vocab", "act_embed"))
        return jnp.take(table, ids_bt, axis=0).astype(dtype_of(self.config.compute_dtype))


class Backbone(nn.Module):
    """Embeddings, the layers (unrolled, or one scan when `config.scan_layers`), final norm."""

    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.embeddings = Embedding(c)
        if c.scan_layers:
            self.layers = ScannedLayers(c)
        else:
            block = block_class(c)
            self.layers = [block(c, kind) for kind in c.layer_types]
        self.norm_f = RMSNorm(c.layer_norm_epsilon, dtype_of(c.param_dtype))

    def __call__(self, ids_bt: jax.Array, valid_bt: jax.Array | None, layer_caches: Any,
                 index: jax.Array | int, per_position_states: bool = False) -> tuple[jax.Array, Any]:
        x = sharding.constrain(self.embeddings(ids_bt), ("batch", "length", "act_embed"))
        if self.config.scan_layers:
            x, new_caches = self.layers(x, valid_bt, layer_caches, index, per_position_states)
            return self.norm_f(x), new_caches
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, valid_bt, None if layer_caches is None else layer_caches[i], index,
                                   per_position_states)
            new_caches.append(layer_cache)
        return self.norm_f(x), (None if layer_caches is None else tuple(new_caches))


class MTPLayer(nn.Module):
    """One sublayer of the MTP block; the first fuses embedding and hidden, the last norms the output."""

    config: ModelConfig
    kind: str
    first: bool
    last: bool

    @nn.compact
    def __call__(self, x_btd: jax.Array, e_btd: jax.Array | None, valid_bt: jax.Array | None, cache: Any,
                 index: jax.Array | int) -> tuple[jax.Array, Any]:
        c = self.config
        dtype, pdtype = dtype_of(c.compute_dtype), dtype_of(c.param_dtype)
        if self.first:
            e = RMSNorm(c.layer_norm_epsilon, pdtype, name="enorm")(e_btd)
            h = RMSNorm(c.layer_norm_epsilon, pdtype, name="hnorm")(x_btd)
            x_btd = Linear(c.hidden_size, ("mtp_concat", "embed"), dtype, pdtype, config=c, name="eh_proj")(
                jnp.concatenate([e, h], axis=-1))
        x_btd, cache = block_class(c)(c, self.kind, name="block")(x_btd, valid_bt, cache, index, False)
        if self.last:
            x_btd = RMSNorm(c.layer_norm_epsilon, pdtype, name="final_layernorm")(x_btd)
        return x_btd, cache


class MTPBlock(nn.Module):
    config: ModelConfig

    def setup(self) -> None:
        kinds = self.config.mtp_layer_types
        self.layers = [MTPLayer(self.config, kind, i == 0, i == len(kinds) - 1) for i, kind in enumerate(kinds)]

    def __call__(self, h_btd: jax.Array, e_btd: jax.Array, valid_bt: jax.Array | None, caches: Any,
                 index: jax.Array | int) -> tuple[jax.Array, Any]:
        x, new_caches = h_btd, []
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, e_btd, valid_bt, None if caches is None else caches[i], index)
            new_caches.append(cache)
        return x, (None if caches is None else tuple(new_caches))


class NemotronH(nn.Module):
    config: ModelConfig

    def setup(self) -> None:
        c = self.config
        self.backbone = Backbone(c)
        self.lm_head = Linear(c.vocab_size, ("embed", "vocab"), dtype_of(c.compute_dtype), dtype_of(c.param_dtype),
                              config=c)
        if c.has_mtp:
            self.mtp = MTPBlock(c)

    def __call__(self, input_ids: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        logits, _, _ = self.forward(input_ids, valid)
        if self.config.has_mtp and self.is_initializing():
            dtype = dtype_of(self.config.compute_dtype)
            self.mtp_forward(jnp.zeros(input_ids.shape + (self.config.hidden_size,), dtype), input_ids, valid)
        return logits

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        return self.lm_head(hidden_btd).astype(jnp.float32)

    def forward(self, input_ids: jax.Array, valid: jax.Array | None = None, cache: Cache | None = None,
                per_position_states: bool = False) -> tuple[jax.Array, jax.Array, Cache | None]:
        """Main model. Returns (logits [b,t,V] f32, final hidden after norm_f [b,t,d], new cache).

        With a cache, each row's write position advances by `filled_length(valid)`: a row padded on the
        right moves by its real tokens only (what continuous batching does with prompt chunks).

        With `per_position_states`, each Mamba layer's returned cache holds its conv and SSM states
        after every position ([b, t, ...]) rather than after the last (for speculative rollback).
        """
        hidden, new_cache = self.hidden_states(input_ids, valid, cache, per_position_states)
        return self.logits(hidden), hidden, new_cache

    def hidden_states(self, input_ids: jax.Array, valid: jax.Array | None = None, cache: Cache | None = None,
                      per_position_states: bool = False) -> tuple[jax.Array, Cache | None]:
        """`forward` without the lm_head: (final hidden after norm_f [b,t,d], new cache). Training applies
        the lm_head chunk by chunk (`nemojax.train.losses`), never to every position at once."""
        index = 0 if cache is None else cache["index"]
        hidden, layer_caches = self.backbone(input_ids, valid, None if cache is None else cache["layers"], index,
                                             per_position_states)
        new_cache = None
        if cache is not None:
            new_cache = dict(cache, layers=layer_caches,
                             index=cache["index"] + filled_length(valid, input_ids.shape[1]))
        return hidden, new_cache

    def mtp_forward(self, hidden_btd: jax.Array, next_ids: jax.Array, valid: jax.Array | None = None,
                    cache: Cache | None = None) -> tuple[jax.Array, jax.Array, Cache | None]:
        """MTP block: from the hidden state at t and token t+1, logits for token t+2.

        `cache` is the MTP part of a decoding cache ({"index", "layers"}). Returns (logits, the
        block's output hidden state, which feeds the next draft step, new cache).
        """
        out, new_cache = self.mtp_hidden(hidden_btd, next_ids, valid, cache)
        return self.logits(out), out, new_cache

    def mtp_hidden(self, hidden_btd: jax.Array, next_ids: jax.Array, valid: jax.Array | None = None,
                   cache: Cache | None = None) -> tuple[jax.Array, Cache | None]:
        """`mtp_forward` without the lm_head: (the block's output hidden state, new cache)."""
        e = self.backbone.embeddings(next_ids)
        index = 0 if cache is None else cache["index"]
        out, layer_caches = self.mtp(hidden_btd.astype(e.dtype), e, valid,
                                     None if cache is None else cache["layers"], index)
        new_cache = None
        if cache is not None:
            new_cache = dict(cache, layers=layer_caches,
                             index=cache["index"] + filled_length(valid, next_ids.shape[1]))
        return out, new_cache


def _layer_cache(config: ModelConfig, kind: str, batch: int, max_len: int, dtype: jnp.dtype) -> Any:
    if kind == "mamba":
        return init_mamba_cache(config, batch, dtype)
    if kind == "attention":
        return init_kv_cache(config, batch, max_len, dtype)
    return None


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> Cache:
    """Empty decoding caches for the main stack and (if present) the MTP block."""
    dtype = dtype or dtype_of(config.compute_dtype)

    def one(kind: str) -> Any:
        return _layer_cache(config, kind, batch, max_len, dtype)

    cache: Cache = {
        "index": jnp.zeros((batch,), jnp.int32),
        "layers": stacked_caches(config, one) if config.scan_layers else tuple(map(one, config.layer_types)),
    }
    if config.has_mtp:
        cache["mtp"] = {
            "index": jnp.zeros((batch,), jnp.int32),
            "layers": tuple(_layer_cache(config, k, batch, max_len, dtype) for k in config.mtp_layer_types),
        }
    return cache
