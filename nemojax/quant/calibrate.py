"""Activation ranges for post-training quantization: run a float model on calibration tokens and record
the input amax of every linear (the `input_scale` a ModelOpt checkpoint stores) and the key/value amax
of every attention layer (`k_scale`, `v_scale`).

Routed experts get one amax per expert over the tokens routed to it (the up projection's input, and
the down projection's input relu²(x @ up)); an expert no calibration token reached takes the largest
amax of its layer's experts. Keys are the published module names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nemojax.checkpoint.hf import published_tensors
from nemojax.config import ModelConfig
from nemojax.model import NemotronH
from nemojax.model.layers import Linear, relu2
from nemojax.model.moe import Experts
from nemojax.model.stacking import to_layout
from nemojax.ops.grouped_matmul import grouped_matmul

Stats = dict[tuple[str, ...], jax.Array]


def _module_names(config: ModelConfig) -> dict[tuple[tuple[str, ...], int], str]:
    """(nemojax path of a linear's weight leaf, expert index or -1) -> published module name."""
    return {(p.path, p.expert): name.removesuffix(".weight") for name, p in published_tensors(config).items()
            if p.layout in ("transpose", "expert")}


def _expert_amax(module: nn.Module, x_td: jax.Array, ids_tk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-expert amax of the up input and of the down input, over the tokens routed to each expert
    (token copies sorted by expert, as the MoE computes them: T*k rows, not T*E)."""
    up = module.variables["params"]["up_proj"].astype(jnp.float32)
    num_experts, k = up.shape[0], ids_tk.shape[1]
    flat = ids_tk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = x_td.astype(jnp.float32)[order // k]
    h = relu2(grouped_matmul(rows, up, jnp.bincount(flat, length=num_experts)))

    def per_expert(values):
        return jnp.maximum(jax.ops.segment_max(jnp.max(jnp.abs(values), axis=1), flat[order],
                                               num_segments=num_experts), 0.0)

    return per_expert(rows), per_expert(h)


def _recorder(stats: Stats):
    """A flax interceptor adding each call's amaxes into `stats` (keyed by weight-leaf paths)."""
    def keep(key, value):
        stats[key] = jnp.maximum(stats.get(key, 0.0), value)

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return out
        if isinstance(module, Linear):
            keep(module.path + ("kernel",), jnp.max(jnp.abs(args[0].astype(jnp.float32))))
            if module.name in ("k_proj", "v_proj"):
                keep(module.path[:-1] + (module.name[0] + "_cache",), jnp.max(jnp.abs(out.astype(jnp.float32))))
        elif isinstance(module, Experts):
            up, down = _expert_amax(module, args[0], args[1])
            keep(module.path + ("up_proj",), up)
            keep(module.path + ("down_proj",), down)
        return out
    return intercept


def calibrate(model: nn.Module, variables: dict, batches: Iterable[np.ndarray]) -> dict[str, float]:
    """{module: input amax} for every linear (experts: "<layer>.experts.<e>.<proj>"), and
    {"<attention module>.k_cache" / ".v_cache": amax of the keys / values}, over `batches` of token ids
    [b, t]. The MTP block sees the main model's hidden states and the next tokens, as in training.

    A scanned model runs unscanned here: the interceptor records values per layer module, and a scan over
    the layers traces each kind's module once for all of its layers."""
    if model.config.scan_layers:
        model = NemotronH(dataclasses.replace(model.config, scan_layers=False))
        variables = to_layout(model.config, variables, stacked=False)

    def run(variables, ids):
        stats: Stats = {}
        with nn.intercept_methods(_recorder(stats)):
            _, hidden, _ = model.apply(variables, ids, method=model.forward)
            if model.config.has_mtp:
                model.apply(variables, hidden[:, :-1], ids[:, 1:], method=model.mtp_forward)
        return stats

    total: dict[tuple[str, ...], np.ndarray] = {}
    step = jax.jit(run)
    for ids in batches:
        for path, value in jax.device_get(step(variables, jnp.asarray(ids, jnp.int32))).items():
            total[path] = np.maximum(total.get(path, 0.0), np.asarray(value, np.float32))
    names = _module_names(model.config)
    out: dict[str, float] = {}
    for path, value in total.items():
        if path[-1] in ("k_cache", "v_cache"):
            attention = names[(path[:-1] + ("k_proj", "kernel"), -1)].rsplit(".", 1)[0]
            out[f"{attention}.{path[-1]}"] = float(value)
        elif value.ndim == 1:  # per expert; an expert no token reached takes its layer's largest amax
            for e, amax in enumerate(np.where(value > 0, value, value.max())):
                out[names[(path, e)]] = float(amax)
        else:
            out[names[(path, -1)]] = float(value)
    return out
