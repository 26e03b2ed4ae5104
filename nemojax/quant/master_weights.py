"""Quantized model variables -> float variables (for fine-tuning a ModelOpt checkpoint).

Training keeps float master weights, so a model loaded from an NVFP4/FP8 checkpoint is dequantised
once, exactly (`nemojax.quant.nvfp4.dequantize`, `fp8.dequantize`), into the layout a float model of
the same architecture has: Linear `kernel` [in, out], experts `<proj>` [E, in, out]. The scales
(weight, input, KV cache) are dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.quant import fp8, nvfp4


def _node(tree: dict, path: list[str]) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def _float_weight(node: dict, prefix: str, fmt: str, dtype: jnp.dtype) -> jax.Array:
    """Pop the quantized tensors named `prefix`* from `node`; return the float weight in the nemojax layout."""
    node.pop(f"{prefix}input_scale", None)
    if fmt == "fp8":  # Linear: "kernel" + scalar scale; experts: "<proj>" + one scale per expert
        q, scale = node.pop(prefix.removesuffix("_") or "kernel"), node.pop(f"{prefix}weight_scale")
        return fp8.dequantize(q, scale, None if scale.ndim == 0 else 0, dtype)
    w_nk = nvfp4.dequantize(node.pop(f"{prefix}weight"), node.pop(f"{prefix}weight_scale"),
                            node.pop(f"{prefix}weight_scale_2"))
    return jnp.swapaxes(w_nk, -1, -2).astype(dtype)


def dequantize_variables(config: ModelConfig, variables: dict, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """(float config, float variables) of a quantized model; floats in `dtype` (default: param_dtype)."""
    dtype = jnp.dtype(dtype or config.param_dtype)
    params = jax.tree.map(lambda x: x, variables["params"])  # a copy of the dict structure
    for key, fmt in config.weight_formats:
        path = key.split("/")
        if path[-2] == "experts":  # stacked experts: leaves "<proj>", "<proj>_weight", ... in the Experts module
            node, proj = _node(params, path[:-1]), path[-1]
            node[proj] = _float_weight(node, f"{proj}_", fmt, dtype)
        else:
            node = _node(params, path)
            node["kernel"] = _float_weight(node, "", fmt, dtype)
    if config.kv_cache_quant != "none":
        for i, kind in enumerate(config.layer_types):
            if kind == "attention":
                mixer = params["backbone"][f"layers_{i}"]["mixer"]
                mixer.pop("k_scale"), mixer.pop("v_scale")
        for i, kind in enumerate(config.mtp_layer_types if config.has_mtp else ()):
            if kind == "attention":
                mixer = params["mtp"][f"layers_{i}"]["block"]["mixer"]
                mixer.pop("k_scale"), mixer.pop("v_scale")
    return config.replace(weight_formats=(), kv_cache_quant="none"), dict(variables, params=params)

