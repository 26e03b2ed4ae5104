"""Quantized model variables -> float variables (for fine-tuning a ModelOpt checkpoint).

Training keeps float master weights, so a model loaded from an NVFP4/FP8 checkpoint is dequantised
once, exactly (`nemojax.quant.nvfp4.dequantize`, FP8 times its scale), into the layout a float model of
the same architecture has: Linear `kernel` [in, out], experts `<proj>` [E, in, out]. The scales
(weight, input, KV cache) are dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.model.stacking import LAYERS_NAME
from nemojax.quant import nvfp4


def _node(tree: dict, path: list[str]) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def _variable_path(config: ModelConfig, key: str) -> tuple[str, ...]:
    """Where the weight of a per-layer key lives in the variables (a kind's stack with scanned layers)."""
    path = tuple(key.split("/"))
    if config.scan_layers and path[0] == "backbone" and path[1].startswith(f"{LAYERS_NAME}_"):
        return ("backbone", LAYERS_NAME, config.layer_types[int(path[1].split("_")[1])]) + path[2:]
    return path


def _float_weight(node: dict, prefix: str, fmt: str, dtype: jnp.dtype) -> jax.Array:
    """Pop the quantized tensors named `prefix`* from `node`; return the float weight in the nemojax layout."""
    node.pop(f"{prefix}input_scale", None)
    if fmt == "fp8":  # Linear: "kernel" + a scale; experts: "<proj>" + a scale per expert (each per stacked layer)
        q, scale = node.pop(prefix.removesuffix("_") or "kernel"), node.pop(f"{prefix}weight_scale")
        scale = scale.reshape(scale.shape + (1,) * (q.ndim - scale.ndim))
        return (q.astype(jnp.float32) * scale).astype(dtype)
    w_nk = nvfp4.dequantize(node.pop(f"{prefix}weight"), node.pop(f"{prefix}weight_scale"),
                            node.pop(f"{prefix}weight_scale_2"))
    return jnp.swapaxes(w_nk, -1, -2).astype(dtype)


def dequantize_variables(config: ModelConfig, variables: dict, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """(float config, float variables) of a quantized model; floats in `dtype` (default: param_dtype)."""
    dtype = jnp.dtype(dtype or config.param_dtype)
    params = jax.tree.map(lambda x: x, variables["params"])  # a copy of the dict structure
    done = set()
    for key, fmt in config.weight_formats:
        path = _variable_path(config, key)
        if path in done:  # a stacked leaf holds every layer of its kind
            continue
        done.add(path)
        if path[-2] == "experts":  # stacked experts: leaves "<proj>", "<proj>_weight", ... in the Experts module
            node, proj = _node(params, list(path[:-1])), path[-1]
            node[proj] = _float_weight(node, f"{proj}_", fmt, dtype)
        else:
            node = _node(params, list(path))
            node["kernel"] = _float_weight(node, "", fmt, dtype)
    if config.kv_cache_quant != "none":
        attention = [("backbone", f"{LAYERS_NAME}_{i}", "mixer") for i, k in enumerate(config.layer_types)
                     if k == "attention"]
        if config.scan_layers:
            attention = [("backbone", LAYERS_NAME, "attention", "mixer")] if attention else []
        attention += [("mtp", f"layers_{i}", "block", "mixer") for i, k in enumerate(config.mtp_layer_types)
                      if k == "attention" and config.has_mtp]
        for path in attention:
            mixer = _node(params, list(path))
            mixer.pop("k_scale"), mixer.pop("v_scale")
    return config.replace(weight_formats=(), kv_cache_quant="none"), dict(variables, params=params)

