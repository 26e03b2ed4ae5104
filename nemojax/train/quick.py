"""A few training steps on in-memory token batches: the real train step (LM + MTP loss) without the
run machinery (data pipeline, checkpoints, metrics). For tests, benchmarks and notebook experiments."""

from __future__ import annotations

from collections.abc import Iterable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from nemojax.train.step import init_state, make_train_step


def fit_token_batches(model: nn.Module, variables: dict, batches_bt: Iterable[np.ndarray], learning_rate: float,
                      mtp_loss_weight: float = 0.3) -> dict:
    """Adam at a constant rate over batches of token ids [B, T+1] (inputs [:, :-1], targets [:, 1:]).

    Returns the trained variables (params and the unchanged MoE correction biases).
    """
    settings = ml_collections.ConfigDict(dict(grad_accum_steps=1, mtp_loss_weight=mtp_loss_weight,
                                              aux_loss_weight=0.0, bias_update_rate=0.0))
    schedule = optax.constant_schedule(learning_rate)
    tx = optax.adam(schedule)
    step = jax.jit(make_train_step(model, tx, settings, schedule), donate_argnums=0)
    state = init_state(variables, tx, seed=0)
    for ids in batches_bt:
        batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones(ids[:, 1:].shape, bool)}
        state, _ = step(state, batch)
    return {**variables, "params": state["params"], "buffers": state["buffers"]}
