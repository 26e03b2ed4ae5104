"""Auxiliary-loss-free MoE load balancing: nudge each router's `e_score_correction_bias` towards
under-used experts by `rate * sign(mean_load - load)` after every step, and load statistics."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

BIAS_NAME = "e_score_correction_bias"


def update_correction_bias(buffers: Any, loads: dict[tuple[str, ...], jax.Array], rate: float) -> Any:
    """New buffers: every correction bias under MoE module path P moves by rate * sign(mean - load[P])."""
    flat = flatten_dict(buffers)
    for path, bias in flat.items():
        if path[-1] != BIAS_NAME:
            continue
        load = loads[path[:-2]].astype(jnp.float32)  # [E], or [layers, E] for stacked MoE layers
        flat[path] = bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load).astype(bias.dtype)
    return unflatten_dict(flat)


def load_ratios(loads: dict[tuple[str, ...], jax.Array]) -> dict[str, jax.Array]:
    """max/mean expert load per MoE layer (1.0 is perfectly balanced), keyed by the layer's path; the
    MoE layers of a scanned stack (loads [layers, E]) by their stack path and row: ".../moe/mixer/3"."""
    out = {}
    for path, load in sorted(loads.items()):
        load = load.astype(jnp.float32)
        ratio = jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9)
        if load.ndim == 1:
            out["/".join(path)] = ratio
        else:
            out.update({"/".join(path + (str(row),)): ratio[row] for row in range(load.shape[0])})
    return out
