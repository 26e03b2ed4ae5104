"""One training step and one evaluation step, pure functions of (state, batch) for `jax.jit`.

The train step accumulates gradients over `grad_accum_steps` micro-batches (a scan), clips and
applies AdamW, then moves the MoE correction biases from the step's expert loads. A non-finite
loss or gradient norm keeps params, optimizer state and buffers unchanged (decided on device,
no host round trip) and counts the step as bad.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nemojax.train.losses import LOSS_CHUNK_TOKENS, Batch, chunked_xent_sum, model_losses, token_counts
from nemojax.train.moe_balance import load_ratios, update_correction_bias
from nemojax.train.optimizer import learning_rate

# state: {"step", "params", "buffers", "opt_state", "rng", "bad_steps"}; a plain dict so that
# Orbax saves and restores it without custom types.
TrainState = dict[str, Any]


def init_state(variables: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Fresh training state around model variables (step 0, new optimizer state)."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": variables["params"],
        "buffers": variables.get("buffers", {}),
        "opt_state": tx.init(variables["params"]),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "bad_steps": jnp.zeros((), jnp.int32),
    }


def _split_micro(batch: Batch, n: int) -> Batch:
    """[B, T] -> [n, B/n, T] micro-batches taking every n-th row, so that rows sharded in contiguous blocks
    over devices give every device its share of each micro-batch."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={n}")
        return x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, cfg: ml_collections.ConfigDict,
                    schedule: optax.Schedule) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The step function for `cfg` (grad_accum_steps, mtp_loss_weight, aux_loss_weight, bias_update_rate,
    loss_chunk_tokens)."""
    accum = int(cfg.grad_accum_steps)
    mtp_weight, aux_weight, rate = float(cfg.mtp_loss_weight), float(cfg.aux_loss_weight), float(cfg.bias_update_rate)
    chunk = int(cfg.get("loss_chunk_tokens", LOSS_CHUNK_TOKENS))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        params, buffers = state["params"], state["buffers"]
        denominators = token_counts(batch, model.config.mtp_num_depths)
        grad_fn = jax.value_and_grad(model_losses, argnums=1, has_aux=True)
        micro_batches = _split_micro(batch, accum)
        # The NVFP4 training recipe's random stream: new keys every step and micro-batch.
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

        def micro_grads(micro: Batch, index: jax.Array):
            return grad_fn(model, params, buffers, micro, denominators, mtp_weight, aux_weight / accum, chunk,
                           jax.random.fold_in(step_key, index))

        def accumulate(total, micro_and_index):
            return jax.tree.map(jnp.add, total, micro_grads(*micro_and_index)), None

        shapes = jax.eval_shape(micro_grads, jax.tree.map(lambda x: x[0], micro_batches), jnp.int32(0))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        ((loss, parts), grads), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(accum)))
        parts = dict(parts, aux_loss=parts["aux_loss"] / accum)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_buffers = update_correction_bias(buffers, parts["expert_load"], rate)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "step": state["step"] + 1,
            "params": keep(new_params, params),
            "buffers": keep(new_buffers, buffers),
            "opt_state": keep(opt_state, state["opt_state"]),
            "rng": state["rng"],
            "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1),
        }
        metrics = {
            "loss": loss, "lm_loss": parts["lm_loss"], "mtp_loss": parts["mtp_loss"], "aux_loss": parts["aux_loss"],
            "grad_norm": grad_norm, "lr": learning_rate(state["opt_state"], schedule), "skipped": ~finite,
            "bad_steps": new_state["bad_steps"], "expert_load": load_ratios(parts["expert_load"]),
            "dropped_rows": parts["dropped_rows"],
        }
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, chunk_tokens: int = LOSS_CHUNK_TOKENS
                   ) -> Callable[[TrainState, Batch], tuple[jax.Array, jax.Array]]:
    """(masked LM cross-entropy sum, masked token count) of one held-out batch (lm_head in chunks)."""
    def eval_step(state: TrainState, batch: Batch) -> tuple[jax.Array, jax.Array]:
        variables = {"params": state["params"], "buffers": state["buffers"]}
        hidden, _ = model.apply(variables, batch["inputs"], batch.get("segments"), method="hidden_states")
        xent = chunked_xent_sum(lambda h, _: model.apply(variables, h, method="logits"), hidden, batch["targets"],
                                batch["loss_mask"], chunk_tokens)
        return xent, jnp.sum(batch["loss_mask"])
    return eval_step
