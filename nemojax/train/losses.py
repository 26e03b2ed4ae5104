"""Training losses: next-token cross-entropy, the MTP loss (token t+2 from the hidden state at t
and token t+1), and the optional MoE sequence-level auxiliary loss.

Losses are returned as masked sums divided by a caller-given token count, so that gradients of
micro-batches add up to exactly the gradient of the whole batch. The lm_head and the softmax run a
chunk of positions at a time (`chunked_xent_sum`): no [batch, time, vocab] float32 logits in either
pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict

from nemojax.model.layers import QUANT_RNG

Batch = dict[str, jax.Array]
Path = tuple[str, ...]
LOSS_CHUNK_TOKENS = 1024  # default tokens (over the global batch) whose logits exist at once


def masked_xent_sum(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Sum over masked positions of -log p(target), computed in float32."""
    xent = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), targets_bt)
    return jnp.sum(xent * mask_bt.astype(jnp.float32))


def loss_chunk_positions(rows: int, positions: int, chunk_tokens: int) -> int:
    """Positions per chunk of `chunked_xent_sum`: rows * c <= chunk_tokens, at least 1, at most all."""
    return max(1, min(positions, chunk_tokens // rows))


def chunked_xent_sum(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], hidden_btd: jax.Array,
                     targets_bt: jax.Array, mask_bt: jax.Array, chunk_tokens: int = LOSS_CHUNK_TOKENS) -> jax.Array:
    """`masked_xent_sum(logits of hidden, ...)` a few positions at a time: each chunk's [b, c, V] float32
    logits exist only inside its step (a scan) and are recomputed for its backward (`jax.checkpoint`), so
    neither pass holds the [b, t, V] logits. Same value and gradient as the full computation.

    `logits_fn(h_bcd, chunk_index)` gives one chunk's logits (the index lets it vary a random key).
    `chunk_tokens` bounds b * c (the positions per chunk c is at least 1); padded positions have mask 0.
    """
    b, t, d = hidden_btd.shape
    c = loss_chunk_positions(b, t, chunk_tokens)
    n = -(-t // c)
    pad = ((0, 0), (0, n * c - t))

    def chunks(x: jax.Array) -> jax.Array:  # [b, t, ...] -> [n, b, c, ...]
        x = jnp.pad(x, pad + ((0, 0),) * (x.ndim - 2))
        return x.reshape((b, n, c) + x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one(h_bcd, y_bc, m_bc, chunk):
        return masked_xent_sum(logits_fn(h_bcd, chunk), y_bc, m_bc)

    def step(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (chunks(hidden_btd), chunks(targets_bt),
                                                              chunks(mask_bt), jnp.arange(n)))
    return total


def token_counts(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Denominators of the LM and MTP losses: masked tokens (at least 1) of the whole batch."""
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.maximum(jnp.sum(mask), 1.0), jnp.maximum(jnp.sum(mask[:, 1:]), 1.0)


def moe_intermediates(intermediates: Any) -> tuple[dict[Path, jax.Array], jax.Array, jax.Array]:
    """Expert-load counts keyed by MoE module path ([E], or [layers, E] for scanned layers), the sum of
    the sown aux losses and the sum of the token copies dropped for expert capacity."""
    loads, aux, dropped = {}, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    for path, value in flatten_dict(intermediates).items():
        if path[-1] == "expert_load":
            loads[path[:-1]] = sum(value)
        elif path[-1] == "aux_loss":
            aux = aux + jnp.sum(sum(value))
        elif path[-1] == "dropped_rows":
            dropped = dropped + jnp.sum(sum(value))
    return loads, aux, dropped


def model_losses(model: nn.Module, params: Any, buffers: Any, batch: Batch, denominators: tuple[jax.Array, jax.Array],
                 mtp_weight: float, aux_weight: float, chunk_tokens: int = LOSS_CHUNK_TOKENS,
                 rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Total loss = LM + mtp_weight * MTP + aux_weight * aux, and its parts (plus expert loads and dropped
    copies) as aux data. The lm_head runs in chunks of `chunk_tokens` (`chunked_xent_sum`). `rng` feeds
    the NVFP4 training recipe's stochastic rounding (`nemojax.model.layers.QUANT_RNG`): one key for the
    backbone, one for the MTP block, one per lm_head chunk."""
    variables = {"params": params, "buffers": buffers}
    lm_den, mtp_den = denominators
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]

    def rngs(*path: int) -> dict[str, Any]:
        if rng is None:
            return {}
        key = rng
        for i in path:
            key = jax.random.fold_in(key, i)
        return {"rngs": {QUANT_RNG: key}}

    def head(stream: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
        return lambda h_bcd, chunk: model.apply(variables, h_bcd, method="logits", **rngs(stream, chunk))

    (hidden, _), inter = model.apply(variables, inputs, method="hidden_states", mutable=["intermediates"], **rngs())
    lm_loss = chunked_xent_sum(head(2), hidden, targets, mask, chunk_tokens) / lm_den
    loads, aux_loss, dropped = moe_intermediates(inter.get("intermediates", {}))
    mtp_loss = jnp.zeros((), jnp.float32)
    if model.config.has_mtp and mtp_weight > 0:
        (mtp_hidden, _), mtp_inter = model.apply(variables, hidden[:, :-1], inputs[:, 1:], method="mtp_hidden",
                                                 mutable=["intermediates"], **rngs(1))
        mtp_loss = chunked_xent_sum(head(3), mtp_hidden, targets[:, 1:], mask[:, 1:], chunk_tokens) / mtp_den
        mtp_loads, mtp_aux, mtp_dropped = moe_intermediates(mtp_inter.get("intermediates", {}))
        loads.update(mtp_loads)
        aux_loss, dropped = aux_loss + mtp_aux, dropped + mtp_dropped
    total = lm_loss + mtp_weight * mtp_loss + aux_weight * aux_loss
    return total, {"lm_loss": lm_loss, "mtp_loss": mtp_loss, "aux_loss": aux_loss, "expert_load": loads,
                   "dropped_rows": dropped}
