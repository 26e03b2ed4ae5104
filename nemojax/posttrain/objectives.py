"""The jitted update of an on-policy step (MOPD or GRPO loss), and the frozen models' forward.

The update is the training step's: gradients of the loss, global-norm clipping and AdamW from the run's
optimizer config, and a non-finite loss or gradient keeps the state unchanged and counts a bad step.
The MoE correction biases (buffers) are not moved: post-training keeps the routing balance it was given.
One optimizer update per batch of rollouts, so the GRPO "old" policy is the current one (ratio 1, the
clip only matters for a caller that reuses rollouts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from nemojax.config import ModelConfig
from nemojax.model import NemotronH
from nemojax.train.optimizer import learning_rate
from nemojax.train.policy_losses import grpo_loss, mopd_loss, reverse_kl_per_token, token_logprobs
from nemojax.train.step import TrainState

Batch = dict[str, jax.Array]
LossFn = Callable[[dict, Batch], tuple[jax.Array, dict]]


def masked_row_means(values_nt: jax.Array, mask_nt: jax.Array) -> jax.Array:
    """Per-row mean of `values` over the masked positions [n] (0 for a row without any)."""
    return jnp.sum(values_nt * mask_nt, axis=1) / jnp.maximum(jnp.sum(mask_nt, axis=1), 1.0)


def entropy_per_token(logits_ntv: jax.Array) -> jax.Array:
    log_p = jax.nn.log_softmax(logits_ntv.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def mopd_objective(model: NemotronH) -> LossFn:
    """Reverse KL(student || the row's teacher) on the student's tokens; per-row KL and entropy as metrics."""
    def loss_fn(variables: dict, batch: Batch) -> tuple[jax.Array, dict]:
        logits = model.apply(variables, batch["inputs"])
        mask = batch["mask"]
        loss = mopd_loss(logits, batch["teacher_logits"], mask)
        detached = jax.lax.stop_gradient(logits)
        return loss, {"kl_rows": masked_row_means(reverse_kl_per_token(detached, batch["teacher_logits"]), mask),
                      "entropy_rows": masked_row_means(entropy_per_token(detached), mask)}
    return loss_fn


def grpo_objective(model: NemotronH, clip_eps: float, kl_coef: float) -> LossFn:
    """Clipped policy gradient with group advantages and the k3 KL penalty to the reference log-probs."""
    def loss_fn(variables: dict, batch: Batch) -> tuple[jax.Array, dict]:
        logits = model.apply(variables, batch["inputs"])
        mask = batch["mask"]
        logp = token_logprobs(logits, batch["targets"])
        loss = grpo_loss(logp, jax.lax.stop_gradient(logp), batch["ref_logp"], batch["advantages"], mask,
                         clip_eps=clip_eps, kl_coef=kl_coef)
        log_ratio = batch["ref_logp"] - jax.lax.stop_gradient(logp)
        k3 = jnp.exp(log_ratio) - log_ratio - 1.0
        return loss, {"kl_rows": masked_row_means(k3, mask),
                      "entropy_rows": masked_row_means(entropy_per_token(jax.lax.stop_gradient(logits)), mask)}
    return loss_fn


def make_update(loss_fn: LossFn, tx: optax.GradientTransformation, schedule: optax.Schedule
                ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """(state, batch) -> (new state, metrics) with the optimizer `tx`; skips non-finite updates."""
    def update(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        params, buffers = state["params"], state["buffers"]
        grad_fn = jax.value_and_grad(lambda p: loss_fn({"params": p, "buffers": buffers}, batch), has_aux=True)
        (loss, parts), grads = grad_fn(params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = dict(state, step=state["step"] + 1, params=keep(new_params, params),
                         opt_state=keep(opt_state, state["opt_state"]),
                         bad_steps=jnp.where(finite, 0, state["bad_steps"] + 1))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": learning_rate(state["opt_state"], schedule),
                   "skipped": ~finite, "bad_steps": new_state["bad_steps"], **parts}
        return new_state, metrics
    return update


@functools.lru_cache(maxsize=8)
def forward_logits(config: ModelConfig) -> Callable[[dict, jax.Array], jax.Array]:
    """Logits [n, t, V] of a frozen model (a teacher, the reference), jitted once per model config."""
    model = NemotronH(config)
    return jax.jit(lambda variables, inputs: model.apply(variables, inputs))


@functools.lru_cache(maxsize=8)
def forward_logprobs(config: ModelConfig) -> Callable[[dict, jax.Array, jax.Array], jax.Array]:
    """log p(target) [n, t] of a frozen model, jitted once per model config (the logits stay on the device)."""
    model = NemotronH(config)
    return jax.jit(lambda variables, inputs, targets: token_logprobs(model.apply(variables, inputs), targets))
