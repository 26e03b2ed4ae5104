"""Weight bytes per device for a storage format, after sharding each leaf through the rule table.

Formats:
- `bf16`: every parameter at its model dtype with `param_dtype=bfloat16` (the MoE router kernels
  stay float32, as the model keeps them).
- `fp8`: every linear weight (the MoE router and lm_head excepted) at 1 byte plus one float32
  scale per tensor (per expert for stacked experts); norms, conv, embeddings, lm_head as in bf16.
- `nvfp4-experts`: the main model's routed experts at 4.5 bits per value (a 4-bit E2M1 code, one
  E4M3 scale per 16 values along the input dim) plus one float32 scale per expert; the rest as in
  bf16 (the MTP block stays bf16, as in the published NVFP4 release).
The routers' `e_score_correction_bias` buffers (float32) are reported apart, under `buffers`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from nemojax.config import ModelConfig
from nemojax.model import abstract_variables
from nemojax.planning.counts import is_mtp, is_routed_expert, leaf_paths
from nemojax.planning.layout import abstract_mesh
from nemojax.sharding.placement import variable_shardings

WEIGHT_FORMATS = ("bf16", "fp8", "nvfp4-experts")
FP32_SCALE_BYTES = 4
NVFP4_BLOCK = 16


def serving_config(config: ModelConfig) -> ModelConfig:
    """The config weights are stored and computed in for serving and for the compiled plans."""
    return config.replace(param_dtype="bfloat16", compute_dtype="bfloat16")


def training_config(config: ModelConfig) -> ModelConfig:
    """Mixed-precision training: float32 parameters, bf16 compute."""
    return config.replace(param_dtype="float32", compute_dtype="bfloat16")


@functools.lru_cache(maxsize=4)
def sharded_leaves(config: ModelConfig, mesh_items: tuple[tuple[str, int], ...]) -> list[tuple[str, str, Any, Any]]:
    """(collection, path, abstract leaf, NamedSharding) for every variable, with the shardings
    `nemojax.sharding.placement.variable_shardings` gives the real model on this mesh (`mesh_items`:
    `tuple(mesh_shape.items())`)."""
    variables = abstract_variables(config)
    shardings = variable_shardings(config, abstract_mesh(dict(mesh_items)))
    out = []
    for collection in ("params", "buffers"):
        leaves = leaf_paths(variables.get(collection, {}))
        placed = jax.tree.leaves(shardings.get(collection, {}))
        out += [(collection, path, leaf, sh) for (path, leaf), sh in zip(leaves, placed, strict=True)]
    return out


def _is_linear(path: str) -> bool:
    return path.endswith("/kernel") and not path.endswith("/mixer/gate/kernel") and not path.startswith("lm_head/")


def _stored_bytes(path: str, leaf: jax.ShapeDtypeStruct, shape: tuple[int, ...], fmt: str) -> int:
    """Bytes of a (local) block of shape `shape` of this leaf, stored in format `fmt`."""
    values = math.prod(shape)
    if fmt == "nvfp4-experts" and is_routed_expert(path) and not is_mtp(path):
        return (values + 1) // 2 + -(-values // NVFP4_BLOCK) + shape[0] * FP32_SCALE_BYTES
    if fmt == "fp8" and is_routed_expert(path):
        return values + shape[0] * FP32_SCALE_BYTES
    if fmt == "fp8" and _is_linear(path):
        return values + FP32_SCALE_BYTES
    return values * np.dtype(leaf.dtype).itemsize


def weight_bytes_per_device(config: ModelConfig, mesh_shape: Mapping[str, int], fmt: str) -> dict[str, int]:
    """{"routed_experts", "other", "buffers"}: bytes one device holds in format `fmt`."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {fmt!r}: expected one of {WEIGHT_FORMATS}")
    out = {"routed_experts": 0, "other": 0, "buffers": 0}
    for collection, path, leaf, sharding in sharded_leaves(serving_config(config), tuple(mesh_shape.items())):
        shape = sharding.shard_shape(leaf.shape)
        if collection == "buffers":
            out["buffers"] += math.prod(shape) * np.dtype(leaf.dtype).itemsize
        else:
            out["routed_experts" if is_routed_expert(path) else "other"] += _stored_bytes(path, leaf, shape, fmt)
    return out


def training_bytes_per_device(config: ModelConfig, mesh_shape: Mapping[str, int]) -> dict[str, int]:
    """Training keeps float32 parameters (the master copy; matmuls cast them to bf16), float32
    gradients and AdamW's two float32 moments, all sharded like the parameters: 16 bytes per
    parameter, the same total as bf16 weights + bf16 gradients + an fp32 master and two moments."""
    values = sum(math.prod(sharding.shard_shape(leaf.shape))
                 for collection, _, leaf, sharding in sharded_leaves(serving_config(config), tuple(mesh_shape.items()))
                 if collection == "params")
    return {"weights": 4 * values, "gradients": 4 * values, "optimizer": 8 * values}
