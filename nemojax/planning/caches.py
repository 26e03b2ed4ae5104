"""Decoding-cache bytes per device: KV caches of the attention layers (main stack and MTP block) and
the Mamba layers' conv and SSM states, laid out as `nemojax.model.init_cache` builds them.

Cache sharding (the rule table through `nemojax.sharding.sized_spec`): batch over (data, fsdp,
expert) as far as they divide it, KV heads over `tensor` (replicated when `tensor` does not divide
them: Nemotron 3 has 2), Mamba heads and conv channels over `tensor` in whole Mamba groups (as the
layer's weights); caches stacked over layers (scanned layers) keep that axis whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

from nemojax.config import ModelConfig
from nemojax.model import init_cache
from nemojax.planning.layout import abstract_mesh, local_bytes
from nemojax.sharding import cache_shardings, head_units


def abstract_cache(config: ModelConfig, batch: int, max_len: int):
    """ShapeDtypeStructs of the full decoding cache."""
    return jax.eval_shape(lambda: init_cache(config, batch, max_len))


def cache_bytes_per_device(config: ModelConfig, batch: int, max_len: int,
                           mesh_shape: Mapping[str, int]) -> dict[str, int]:
    """{"kv_cache", "ssm_state"}: bytes one device holds for `batch` sequences of `max_len` tokens."""
    cache = abstract_cache(config, batch, max_len)
    shardings = cache_shardings(cache, abstract_mesh(mesh_shape), head_units(config))
    out = {"kv_cache": 0, "ssm_state": 0}
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(cache), jax.tree.leaves(shardings),
                                      strict=True):
        name = path[-1].key
        if name != "index":
            out["kv_cache" if name in ("k", "v", "valid") else "ssm_state"] += local_bytes(leaf, sharding)
    return out
