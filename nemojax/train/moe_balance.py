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
        load = loads[path[:-2]].astype(jnp.float32)
        flat[path] = bias + rate * jnp.sign(jnp.mean(load) - load).astype(bias.dtype)
    return unflatten_dict(flat)


def load_ratios(loads: dict[tuple[str, ...], jax.Array]) -> dict[str, jax.Array]:
    """max/mean expert load per MoE layer (1.0 is perfectly balanced), keyed by the layer's path."""
    out = {}
    for path, load in sorted(loads.items()):
        load = load.astype(jnp.float32)
        out["/".join(path)] = jnp.max(load) / jnp.maximum(jnp.mean(load), 1e-9)
    return out
