"""Synthetic checkpoints in the published layout written with numpy only (no torch, no model init), of
any size: names, shapes and dtypes from nemojax's layout table, values random. For tests that need
a checkpoint bigger than the tiny ones (interrupting a conversion) and for bench/convert.py."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

from nemojax.checkpoint.hf import hf_config_dict, published_tensors
from nemojax.checkpoint.hf_shards import INDEX_FILE, plan_shards, shard_names
from nemojax.checkpoint.placement import published_shape
from nemojax.checkpoint.safetensors_io import TensorEntry, write_streamed
from nemojax.config import ModelConfig
from nemojax.model import abstract_variables

BLOCK_ELEMENTS = 8 * 2**20


def _random_rows(entry: TensorEntry, rng: np.random.Generator):
    """The tensor as row blocks of small random floats (values of N(0, 0.02), in the entry's dtype)."""
    rows = entry.shape[0] if entry.shape else 1
    per_row = max(1, int(np.prod(entry.shape[1:], dtype=np.int64)))
    step = max(1, BLOCK_ELEMENTS // per_row)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        block = rng.standard_normal((n * per_row,), dtype=np.float32) * 0.02
        yield block.astype(entry.dtype).reshape((n, *entry.shape[1:]) if entry.shape else ())


def write_synthetic_checkpoint(directory: str, config: ModelConfig, max_shard_size: int,
                               seed: int = 0) -> int:
    """Write config.json and sharded bf16 safetensors for `config` (float weights); returns the bytes."""
    os.makedirs(directory, exist_ok=True)
    abstract = abstract_variables(config)
    entries = []
    for name, p in published_tensors(config).items():
        leaf = abstract[p.collection]
        for key in p.path:
            leaf = leaf[key]
        dtype = np.dtype(np.float32) if p.collection == "buffers" else np.dtype(ml_dtypes.bfloat16)
        entries.append(TensorEntry(name, dtype, published_shape(p, tuple(leaf.shape))))
    rng = np.random.default_rng(seed)
    shards = plan_shards(entries, max_shard_size)
    names = shard_names(len(shards))
    for name, shard in zip(names, shards, strict=True):
        write_streamed(os.path.join(directory, name), shard, lambda entry: _random_rows(entry, rng))
    if len(names) > 1:
        weight_map = {e.name: n for n, shard in zip(names, shards, strict=True) for e in shard}
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_dict(config.replace(param_dtype="bfloat16"), "bfloat16"), f, indent=2)
    return sum(e.nbytes for e in entries)
