"""Write the published layout as sharded safetensors, streamed from any source of leaves.

The files are the Hugging Face convention: `model.safetensors` when everything fits in one shard, else
`model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json` (`{"metadata": {"total_size"},
"weight_map"}`), tensors packed greedily in table order up to `max_shard_size` (a larger tensor gets a
shard of its own). Each tensor is written in row blocks of about `BLOCK_BYTES`, read from its leaf
through `placement.published_block`, so host memory holds one block, never a shard or the model.

The leaves come from a `LeafSource`: an Orbax tree on disk (`orbax_stream.OrbaxLeaves`) or arrays in
memory (`ArrayLeaves`: sharded jax.Arrays, also across hosts: every process takes part in the gathers
and only the writer writes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from nemojax.checkpoint.placement import Index, Path, Placement, published_block, published_shape
from nemojax.checkpoint.safetensors_io import TensorEntry, write_streamed
from nemojax.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # "5GB", transformers' default
BLOCK_BYTES = 64 * 2**20
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as "5GB" (10^9), "500MiB" (2^20) or "1000000"; ValueError if not one."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"expected a size such as 5GB, 500MB or 2GiB, got {text!r}")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError(f"expected a positive size, got {text!r}")
    return size


class LeafSource(Protocol):
    """Leaves of nemojax variables, by (collection, path): shape, dtype and blocks (numpy)."""

    def shape(self, collection: str, path: Path) -> tuple[int, ...]: ...

    def dtype(self, collection: str, path: Path) -> np.dtype: ...

    def read(self, collection: str, path: Path, index: Index) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class OutputTensor:
    """A published tensor to write: the table's placement, the name, dtype and shape it is written with."""

    entry: TensorEntry
    placement: Placement


def output_tensors(table: Mapping[str, Placement], leaves: LeafSource, dtype: str | None = None,
                   records: Mapping[str, Mapping[str, Any]] | None = None) -> list[OutputTensor]:
    """The tensors to write, in table order: each in its leaf's dtype, or `dtype` for floating tensors the
    model does not keep in float32 or quantized; `records` (name -> {"stored_as", "dtype", "shape"}) give
    the original name, dtype and shape of tensors a conversion stored differently."""
    out = []
    for name, p in table.items():
        leaf_shape = leaves.shape(p.collection, p.path)
        record = (records or {}).get(name, {})
        out_dtype = np.dtype(record.get("dtype", leaves.dtype(p.collection, p.path)))
        keep = p.quantized or p.collection == "buffers" or name.endswith("gate.weight")
        if dtype is not None and not keep and jnp.issubdtype(out_dtype, jnp.floating):
            out_dtype = np.dtype(jnp.dtype(dtype))
        natural = published_shape(p, leaf_shape)
        shape = tuple(record.get("shape", natural))
        if math.prod(shape) != math.prod(natural):
            raise CheckpointError(f"{name}: recorded shape {shape} does not hold its leaf's {natural}")
        out.append(OutputTensor(TensorEntry(record.get("stored_as", name), out_dtype, shape), p))
    return out


def tensor_blocks(tensor: OutputTensor, leaves: LeafSource, block_bytes: int = BLOCK_BYTES) -> Iterator[np.ndarray]:
    """The tensor's bytes as row blocks of about `block_bytes` (numpy, in the output dtype)."""
    p, entry = tensor.placement, tensor.entry
    leaf_shape = leaves.shape(p.collection, p.path)
    read = functools.partial(leaves.read, p.collection, p.path)
    shape = published_shape(p, leaf_shape)
    if not shape:
        yield published_block(p, read, leaf_shape).astype(entry.dtype).reshape(entry.shape)
        return
    itemsize = max(entry.dtype.itemsize, np.dtype(leaves.dtype(p.collection, p.path)).itemsize)
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    step = max(1, block_bytes // row_bytes)
    for start in range(0, shape[0], step):
        yield published_block(p, read, leaf_shape, slice(start, start + step)).astype(entry.dtype, copy=False)


def plan_shards(entries: list[TensorEntry], max_shard_size: int) -> list[list[TensorEntry]]:
    """Entries packed greedily, in order, into shards of at most `max_shard_size` bytes (or one tensor)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_shards(directory: str, tensors: list[OutputTensor], leaves: LeafSource,
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, is_writer: bool = True,
                 on_block: Callable[[int], None] | None = None,
                 read_blocks: Callable[[OutputTensor, LeafSource], Iterator[np.ndarray]] | None = None) -> list[str]:
    """Write the tensors as shards (+ index) into `directory`; returns the file names. On processes that
    are not the writer the blocks are still read (they may be collective gathers) and dropped.
    `on_block(nbytes)` is called after each block (progress); `read_blocks` (default `tensor_blocks`) makes
    a tensor's row blocks from the leaves."""
    read_blocks = read_blocks or tensor_blocks
    by_name = {t.entry.name: t for t in tensors}
    shards = plan_shards([t.entry for t in tensors], max_shard_size)
    names = shard_names(len(shards))

    def blocks(entry: TensorEntry) -> Iterator[np.ndarray]:
        for block in read_blocks(by_name[entry.name], leaves):
            yield block
            if on_block is not None:
                on_block(block.nbytes)

    for name, shard in zip(names, shards, strict=True):
        if is_writer:
            write_streamed(os.path.join(directory, name), shard, blocks)
        else:
            for entry in shard:
                for _ in blocks(entry):
                    pass
    if is_writer and len(names) > 1:
        weight_map = {entry.name: name for name, shard in zip(names, shards, strict=True) for entry in shard}
        index = {"metadata": {"total_size": sum(t.entry.nbytes for t in tensors)},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    return names


class ArrayLeaves:
    """Leaves of in-memory variables (jax.Arrays, possibly sharded over several hosts, or numpy): a block
    is cut out on the devices and gathered to every host (`process_allgather`, a collective: every
    process must read the same blocks in the same order)."""

    def __init__(self, variables: Mapping[str, Any]):
        self.variables = variables

    def _leaf(self, collection: str, path: Path) -> Any:
        node = self.variables[collection]
        for key in path:
            node = node[key]
        return node

    def shape(self, collection: str, path: Path) -> tuple[int, ...]:
        return tuple(self._leaf(collection, path).shape)

    def dtype(self, collection: str, path: Path) -> np.dtype:
        return np.dtype(self._leaf(collection, path).dtype)

    def read(self, collection: str, path: Path, index: Index) -> np.ndarray:
        leaf = self._leaf(collection, path)
        if isinstance(leaf, np.ndarray):
            return leaf[index]
        starts, sizes, squeeze, take = _as_slices(index, leaf.shape)
        if take is None:
            block = _dynamic_slice(leaf, np.asarray(starts, np.int32), tuple(sizes))
        else:
            block = _slice_take(leaf, np.asarray(starts, np.int32), np.asarray(take[1], np.int32), tuple(sizes),
                                take[0])
        return np.asarray(multihost_utils.process_allgather(block, tiled=True)).reshape(
            [n for i, n in enumerate(block.shape) if i not in squeeze])


def _as_slices(index: Index, shape: tuple[int, ...]) -> tuple[list[int], list[int], set[int], tuple | None]:
    """An index (ints, unit-step slices, at most one integer array) as dynamic-slice starts and sizes, the
    axes to drop (ints) and the (axis, indices) to take afterwards (the array)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    starts, sizes, squeeze, take = [], [], set(), None
    for axis, (item, n) in enumerate(zip(index, shape, strict=True)):
        if isinstance(item, slice):
            start, stop, step = item.indices(n)
            if step != 1:
                raise ValueError(f"index {index}: only unit steps are supported")
            starts.append(start)
            sizes.append(max(0, stop - start))
        elif isinstance(item, np.ndarray):
            starts.append(0)
            sizes.append(n)
            take = (axis, item)
        else:
            starts.append(int(item))
            sizes.append(1)
            squeeze.add(axis)
    return starts, sizes, squeeze, take


@functools.partial(jax.jit, static_argnums=2)
def _dynamic_slice(x: jax.Array, starts: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
    return jax.lax.dynamic_slice(x, tuple(starts), sizes)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _slice_take(x: jax.Array, starts: jax.Array, indices: jax.Array, sizes: tuple[int, ...], axis: int) -> jax.Array:
    return jnp.take(jax.lax.dynamic_slice(x, tuple(starts), sizes), indices, axis=axis)
