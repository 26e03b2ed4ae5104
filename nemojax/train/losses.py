"""Training losses: next-token cross-entropy, the MTP loss (token t+2 from the hidden state at t
and token t+1; with `mtp_num_depths` D the block is chained, depth k predicting token t+k+1 from
depth k-1's output and token t+k, and the MTP loss is the mean of the depths' losses), and the
optional MoE sequence-level auxiliary loss.

Losses are returned as masked sums divided by a caller-given token count, so that gradients of
micro-batches add up to exactly the gradient of the whole batch.

Batch: `inputs`, `targets` (int [B, T]), `loss_mask` (float [B, T]: 0 for untrained targets, e.g. the
non-assistant tokens of a chat, and for a target that starts another document) and, for packed
documents, `segments` (int [B, T] document ids of the inputs, 0 = padding; see
`nemojax.model.documents`): the model keeps documents apart and no MTP target crosses a document end.
"""

from __future__ import annotations

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


def masked_xent_sum(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Sum over masked positions of -log p(target), computed in float32."""
    xent = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), targets_bt)
    return jnp.sum(xent * mask_bt.astype(jnp.float32))


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


def moe_intermediates(intermediates: Any) -> tuple[dict[Path, jax.Array], jax.Array]:
    """Expert-load counts keyed by MoE module path, and the sum of the sown aux losses."""
    loads, aux = {}, jnp.zeros((), jnp.float32)
    for path, value in flatten_dict(intermediates).items():
        if path[-1] == "expert_load":
            loads[path[:-1]] = sum(value)
        elif path[-1] == "aux_loss":
            aux = aux + sum(value)
    return loads, aux


def model_losses(model: nn.Module, params: Any, buffers: Any, batch: Batch,
                 denominators: tuple[jax.Array, tuple[jax.Array, ...]], mtp_weight: float, aux_weight: float,
                 rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Total loss = LM + mtp_weight * MTP + aux_weight * aux, and its parts (plus expert loads) as aux data.
    `denominators` come from `token_counts(batch, model.config.mtp_num_depths)`. `rng` feeds the NVFP4
    training recipe's stochastic rounding (`nemojax.model.layers.QUANT_RNG`)."""
    variables = {"params": params, "buffers": buffers}
    rngs = {} if rng is None else {"rngs": {QUANT_RNG: rng}}
    lm_den, mtp_dens = denominators
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
    segments = batch.get("segments")
    (logits, hidden, _), inter = model.apply(variables, inputs, segments, method="forward", mutable=["intermediates"],
                                             **rngs)
    lm_loss = masked_xent_sum(logits, targets, mask) / lm_den
    loads, aux_loss = moe_intermediates(inter.get("intermediates", {}))
    mtp_loss = jnp.zeros((), jnp.float32)
    if model.config.has_mtp and mtp_weight > 0:
        depths = model.config.mtp_num_depths
        for k, depth_mask in enumerate(mtp_masks(batch, depths), start=1):
            if rng is not None:
                rngs = {"rngs": {QUANT_RNG: jax.random.fold_in(rng, k)}}
            valid = None if segments is None else segments[:, :-k]
            (mtp_logits, hidden, _), mtp_inter = model.apply(variables, hidden[:, :-1], inputs[:, k:], valid,
                                                             method="mtp_forward", mutable=["intermediates"], **rngs)
            mtp_loss = mtp_loss + masked_xent_sum(mtp_logits, targets[:, k:], depth_mask) / mtp_dens[k - 1] / depths
            mtp_loads, mtp_aux = moe_intermediates(mtp_inter.get("intermediates", {}))
            for path, load in mtp_loads.items():
                loads[path] = loads[path] + load if path in loads else load
            aux_loss = aux_loss + mtp_aux
    total = lm_loss + mtp_weight * mtp_loss + aux_weight * aux_loss
    return total, {"lm_loss": lm_loss, "mtp_loss": mtp_loss, "aux_loss": aux_loss, "expert_load": loads}
