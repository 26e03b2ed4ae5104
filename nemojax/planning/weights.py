"""Weight bytes per device for a storage format: the variables `load_pretrained` builds for a checkpoint
in that format, each leaf sharded through the rule table.

Formats (what a checkpoint in that format holds, see `nemojax.quant`):
- `bf16`: every parameter at its model dtype with `param_dtype=bfloat16` (the MoE router kernels
  stay float32, as the model keeps them).
- `fp8`: ModelOpt FP8 for every linear (routed experts one module each; the MoE routers and lm_head
  excepted; the `fp8` PTQ recipe): 1 byte per value plus float32 `weight_scale` and `input_scale` per tensor (per expert
  for stacked experts); norms, conv, embeddings, lm_head as in bf16.
- `nvfp4-experts`: the main model's routed experts in NVFP4 (4-bit codes, one E4M3 scale per 16
  values along the input dim, float32 `weight_scale_2` and `input_scale` per expert); the rest as in
  bf16 (the MTP block stays bf16, as in the published NVFP4 release).
- `nvfp4`: every linear in NVFP4 (routers and lm_head excepted), the rest as in bf16.
- `release`: the published Super/Ultra mix (`nemojax.quant.recipes`): NVFP4 routed experts, FP8
  shared experts and Mamba in/out projections, FP8 KV-cache scales, the rest bf16.
The routers' `e_score_correction_bias` buffers (float32) are reported apart, under `buffers`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from nemojax.checkpoint.hf import quant_fields, quantizable_modules
from nemojax.config import ModelConfig
from nemojax.model import abstract_variables
from nemojax.planning.counts import is_routed_expert, leaf_paths, per_layer
from nemojax.planning.layout import abstract_mesh
from nemojax.quant.recipes import recipe_scheme
from nemojax.sharding.placement import variable_shardings

WEIGHT_FORMATS = ("bf16", "fp8", "nvfp4-experts", "nvfp4", "release")


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
    config = per_layer(config)
    variables = abstract_variables(config)
    shardings = variable_shardings(config, abstract_mesh(dict(mesh_items)))
    out = []
    for collection in ("params", "buffers"):
        leaves = leaf_paths(variables.get(collection, {}))
        placed = jax.tree.leaves(shardings.get(collection, {}))
        out += [(collection, path, leaf, sh) for (path, leaf), sh in zip(leaves, placed, strict=True)]
    return out


def stored_config(config: ModelConfig, fmt: str) -> ModelConfig:
    """The serving config of a checkpoint of `config` stored in `fmt`, as `load_pretrained` builds it."""
    config = serving_config(config)
    if fmt == "bf16":
        return config
    scheme = recipe_scheme(fmt, quantizable_modules(config))
    return config.replace(**quant_fields(config, scheme, f"--weights {fmt}"))


def weight_bytes_per_device(config: ModelConfig, mesh_shape: Mapping[str, int], fmt: str) -> dict[str, int]:
    """{"routed_experts", "other", "buffers"}: bytes one device holds in format `fmt`."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight format {fmt!r}: expected one of {WEIGHT_FORMATS}")
    out = {"routed_experts": 0, "other": 0, "buffers": 0}
    for collection, path, leaf, sharding in sharded_leaves(stored_config(config, fmt), tuple(mesh_shape.items())):
        stored = math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        group = "buffers" if collection == "buffers" else "routed_experts" if is_routed_expert(path) else "other"
        out[group] += stored
    return out


def training_bytes_per_device(config: ModelConfig, mesh_shape: Mapping[str, int]) -> dict[str, int]:
    """Training keeps float32 parameters (the master copy; matmuls cast them to bf16), float32
    gradients and AdamW's two float32 moments, all sharded like the parameters: 16 bytes per
    parameter, the same total as bf16 weights + bf16 gradients + an fp32 master and two moments."""
    values = sum(math.prod(sharding.shard_shape(leaf.shape))
                 for collection, _, leaf, sharding in sharded_leaves(serving_config(config), tuple(mesh_shape.items()))
                 if collection == "params")
    return {"weights": 4 * values, "gradients": 4 * values, "optimizer": 8 * values}
