"""Training losses: next-token cross-entropy, the MTP loss (token t+2 from the hidden state at t
and token t+1; with `mtp_num_depths` D the block is chained, depth k predicting token t+k+1 from
depth k-1's output and token t+k, and the MTP loss is the mean of the depths' losses), and the
optional MoE sequence-level auxiliary loss.

Losses are returned as masked sums divided by a caller-given token count, so that gradients of
micro-batches add up to exactly the gradient of the whole batch. The lm_head and the softmax run a
chunk of positions at a time (`chunked_xent_sum`): no [batch, time, vocab] float32 logits in either
pass.

Batch: `inputs`, `targets` (int [B, T]), `loss_mask` (float [B, T]: 0 for untrained targets, e.g. the
non-assistant tokens of a chat, and for a target that starts another document) and, for packed
documents, `segments` (int [B, T] document ids of the inputs, 0 = padding; see
`nemojax.model.documents`): the model keeps documents apart and no MTP target crosses a document end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict

from nemojax.model.documents import document_index
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


def mtp_masks(batch: Batch, depths: int) -> list[jax.Array]:
    """Loss mask [B, T-k] of each MTP depth k = 1..depths: position t is scored on token t+k+1
    (targets[:, t+k]) where that target is trained and, with `segments`, t+k is in t's document."""
    mask = batch["loss_mask"].astype(jnp.float32)
    doc = document_index(batch["segments"]) if "segments" in batch else None
    masks = []
    for k in range(1, depths + 1):
        depth_mask = mask[:, k:]
        if doc is not None:
            depth_mask = depth_mask * (doc[:, k:] == doc[:, :-k])
        masks.append(depth_mask)
    return masks


def token_counts(batch: Batch, mtp_depths: int = 1) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Denominators of the LM loss and of each MTP depth's loss: masked tokens (at least 1) of the whole batch."""
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.maximum(jnp.sum(mask), 1.0), tuple(jnp.maximum(jnp.sum(m), 1.0) for m in mtp_masks(batch, mtp_depths))


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


def model_losses(model: nn.Module, params: Any, buffers: Any, batch: Batch,
                 denominators: tuple[jax.Array, tuple[jax.Array, ...]], mtp_weight: float, aux_weight: float,
                 chunk_tokens: int = LOSS_CHUNK_TOKENS,
                 rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Total loss = LM + mtp_weight * MTP + aux_weight * aux, and its parts (plus expert loads and dropped
    copies) as aux data. `denominators` come from `token_counts(batch, model.config.mtp_num_depths)`. The
    lm_head runs in chunks of `chunk_tokens` (`chunked_xent_sum`). `rng` feeds the NVFP4 training recipe's
    stochastic rounding (`nemojax.model.layers.QUANT_RNG`): one key for the backbone, one per MTP depth,
    one per lm_head chunk of each loss."""
    variables = {"params": params, "buffers": buffers}
    lm_den, mtp_dens = denominators
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
    segments = batch.get("segments")

    def rngs(*path: int) -> dict[str, Any]:
        if rng is None:
            return {}
        key = rng
        for i in path:
            key = jax.random.fold_in(key, i)
        return {"rngs": {QUANT_RNG: key}}

    def head(*stream: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
        return lambda h_bcd, chunk: model.apply(variables, h_bcd, method="logits", **rngs(*stream, chunk))

    (hidden, _), inter = model.apply(variables, inputs, segments, method="hidden_states", mutable=["intermediates"],
                                     **rngs())
    lm_loss = chunked_xent_sum(head(2), hidden, targets, mask, chunk_tokens) / lm_den
    loads, aux_loss, dropped = moe_intermediates(inter.get("intermediates", {}))
    mtp_loss = jnp.zeros((), jnp.float32)
    if model.config.has_mtp and mtp_weight > 0:
        depths = model.config.mtp_num_depths
        for k, depth_mask in enumerate(mtp_masks(batch, depths), start=1):
            valid = None if segments is None else segments[:, :-k]
            (hidden, _), mtp_inter = model.apply(variables, hidden[:, :-1], inputs[:, k:], valid, method="mtp_hidden",
                                                 mutable=["intermediates"], **rngs(1, k))
            depth_loss = chunked_xent_sum(head(3, k), hidden, targets[:, k:], depth_mask, chunk_tokens)
            mtp_loss = mtp_loss + depth_loss / mtp_dens[k - 1] / depths
            mtp_loads, mtp_aux, mtp_dropped = moe_intermediates(mtp_inter.get("intermediates", {}))
            for path, load in mtp_loads.items():
                loads[path] = loads[path] + load if path in loads else load
            aux_loss, dropped = aux_loss + mtp_aux, dropped + mtp_dropped
    total = lm_loss + mtp_weight * mtp_loss + aux_weight * aux_loss
    return total, {"lm_loss": lm_loss, "mtp_loss": mtp_loss, "aux_loss": aux_loss, "expert_load": loads,
                   "dropped_rows": dropped}
