"""Training losses: next-token cross-entropy, the MTP loss (token t+2 from the hidden state at t
and token t+1), and the optional MoE sequence-level auxiliary loss.

Losses are returned as masked sums divided by a caller-given token count, so that gradients of
micro-batches add up to exactly the gradient of the whole batch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict

from nemojax.model.layers import QUANT_RNG

Batch = dict[str, jax.Array]
Path = tuple[str, ...]


def masked_xent_sum(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Sum over masked positions of -log p(target), computed in float32."""
    xent = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), targets_bt)
    return jnp.sum(xent * mask_bt.astype(jnp.float32))


def token_counts(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Denominators of the LM and MTP losses: masked tokens (at least 1) of the whole batch."""
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.maximum(jnp.sum(mask), 1.0), jnp.maximum(jnp.sum(mask[:, 1:]), 1.0)


def moe_intermediates(intermediates: Any) -> tuple[dict[Path, jax.Array], jax.Array]:
    """Expert-load counts keyed by MoE module path, and the sum of the sown aux losses."""
    loads, aux = {}, jnp.zeros((), jnp.float32)
    for path, value in flatten_dict(intermediates).items():
        if path[-1] == "expert_load":
            loads[path[:-1]] = sum(value)
        elif path[-1] == "aux_loss":
            aux = aux + sum(value)
    return loads, aux


def model_losses(model: nn.Module, params: Any, buffers: Any, batch: Batch, denominators: tuple[jax.Array, jax.Array],
                 mtp_weight: float, aux_weight: float,
                 rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Total loss = LM + mtp_weight * MTP + aux_weight * aux, and its parts (plus expert loads) as aux data.
    `rng` feeds the NVFP4 training recipe's stochastic rounding (`nemojax.model.layers.QUANT_RNG`)."""
    variables = {"params": params, "buffers": buffers}
    rngs = {} if rng is None else {"rngs": {QUANT_RNG: rng}}
    lm_den, mtp_den = denominators
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
    (logits, hidden, _), inter = model.apply(variables, inputs, method="forward", mutable=["intermediates"], **rngs)
    lm_loss = masked_xent_sum(logits, targets, mask) / lm_den
    loads, aux_loss = moe_intermediates(inter.get("intermediates", {}))
    mtp_loss = jnp.zeros((), jnp.float32)
    if model.config.has_mtp and mtp_weight > 0:
        if rng is not None:
            rngs = {"rngs": {QUANT_RNG: jax.random.fold_in(rng, 1)}}
        (mtp_logits, _, _), mtp_inter = model.apply(variables, hidden[:, :-1], inputs[:, 1:], method="mtp_forward",
                                                    mutable=["intermediates"], **rngs)
        mtp_loss = masked_xent_sum(mtp_logits, targets[:, 1:], mask[:, 1:]) / mtp_den
        mtp_loads, mtp_aux = moe_intermediates(mtp_inter.get("intermediates", {}))
        loads.update(mtp_loads)
        aux_loss = aux_loss + mtp_aux
    total = lm_loss + mtp_weight * mtp_loss + aux_weight * aux_loss
    return total, {"lm_loss": lm_loss, "mtp_loss": mtp_loss, "aux_loss": aux_loss, "expert_load": loads}
