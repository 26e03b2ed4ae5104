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

from nemojax.config import KV_CACHE_DTYPES, ModelConfig
from nemojax.model import init_cache
from nemojax.planning.layout import abstract_mesh, local_bytes
from nemojax.sharding import cache_shardings, head_units


def abstract_cache(config: ModelConfig, batch: int, max_len: int):
    """ShapeDtypeStructs of the full decoding cache."""
    return jax.eval_shape(lambda: init_cache(config, batch, max_len))


def cache_bytes_per_device(config: ModelConfig, batch: int, max_len: int, mesh_shape: Mapping[str, int],
                           context_parallel: bool = False) -> dict[str, int]:
    """{"kv_cache", "ssm_state"}: bytes one device holds for `batch` sequences of `max_len` tokens
    (`context_parallel`: KV entries sharded along the sequence, see `sharding.cache_shardings`)."""
    cache = abstract_cache(config, batch, max_len)
    shardings = cache_shardings(cache, abstract_mesh(mesh_shape), head_units(config), context_parallel)
    out = {"kv_cache": 0, "ssm_state": 0}
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(cache), jax.tree.leaves(shardings),
                                      strict=True):
        name = path[-1].key
        if name != "index":
            out["kv_cache" if name in ("k", "v", "valid") else "ssm_state"] += local_bytes(leaf, sharding)
    return out


def request_cache_bytes(config: ModelConfig, tokens: int) -> dict:
    """The decoding cache of ONE request of `tokens` tokens, whole (before any sharding), per layer kind
    and for each KV dtype ("bf16", "fp8"): what a long-context request costs, read from the same abstract
    cache as the plan. KV bytes per attention layer include the validity flags (1 byte per position);
    the Mamba state (conv in the compute dtype, SSM in float32) does not grow with `tokens`."""
    def kinds(dtype: str) -> dict[str, list[int]]:
        cache = abstract_cache(config.replace(scan_layers=False, kv_cache_dtype=dtype), 1, tokens)
        out: dict[str, list[int]] = {"attention": [], "mamba": [], "mtp_attention": [], "mtp_mamba": []}
        stacks = [("", config.layer_types, cache["layers"])]
        if "mtp" in cache:
            stacks.append(("mtp_", config.mtp_layer_types, cache["mtp"]["layers"]))
        for prefix, types, layers in stacks:
            for kind, layer in zip(types, layers, strict=True):
                if kind in ("attention", "mamba"):
                    out[prefix + kind].append(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(layer)))
        return out

    report: dict = {"tokens": tokens}
    for name in ("bf16", "fp8"):
        per_kind = kinds(KV_CACHE_DTYPES[name])
        report["attention_layers"] = len(per_kind["attention"]) + len(per_kind["mtp_attention"])
        report["mamba_layers"] = len(per_kind["mamba"]) + len(per_kind["mtp_mamba"])
        attention = per_kind["attention"] + per_kind["mtp_attention"]
        mamba = per_kind["mamba"] + per_kind["mtp_mamba"]
        report[f"kv_bytes_per_attention_layer_{name}"] = max(attention, default=0)
        report["mamba_state_bytes_per_layer"] = max(mamba, default=0)
        report[f"kv_bytes_{name}"] = sum(attention)
        report["mamba_state_bytes"] = sum(mamba)
        report[f"total_bytes_{name}"] = sum(attention) + sum(mamba)
    return report
