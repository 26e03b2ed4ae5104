"""Orbax variable trees read and written one block at a time (tensorstore), never a whole leaf in memory.

Orbax's own save takes a tree of in-memory arrays, so a converter using it would hold the whole model.
`OrbaxTreeWriter` instead writes the files Orbax's `StandardCheckpointer` restores (Orbax 0.12, checked
by the conversion tests: `load_model` restores what it writes): one zarr (v2) array per leaf, named by
its joined path (`params.backbone.embeddings.weight`), uncompressed, chunked so that one chunk is about
`CHUNK_BYTES`; and `_METADATA`, the tree structure, written last. Each chunk is written as a whole (no
read-modify-write), so memory holds one chunk. Chunks split the stacked axes (layers, experts) first,
then the leaf axis holding the published tensor's rows, so a published row block is a few whole chunks
and reads on either side are contiguous.

`OrbaxLeaves` reads blocks of any Orbax tree: the ones written here and the OCDBT trees Orbax writes
(training checkpoints, `save_model`); blocks are read with tensorstore, so memory holds the chunks a
block touches (an Orbax-written leaf is often one chunk: reading it holds the whole leaf).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import tensorstore as ts

from nemojax.checkpoint.placement import Index, Path
from nemojax.errors import CheckpointError

METADATA_FILE = "_METADATA"
CHUNK_BYTES = 64 * 2**20


def leaf_name(collection: str, path: Path) -> str:
    """The name Orbax stores a leaf under: its keys joined by dots."""
    return ".".join((collection, *path))


def chunk_shape(shape: Sequence[int], itemsize: int, split_order: Sequence[int],
                target_bytes: int = CHUNK_BYTES) -> tuple[int, ...]:
    """A chunk shape of about `target_bytes`: axes in `split_order` are shrunk in turn (to 1, the last one
    only as far as needed) until the chunk fits; axes not listed stay whole."""
    chunk = [max(1, n) for n in shape]
    for axis in split_order:
        size = math.prod(chunk) * itemsize
        if size <= target_bytes:
            break
        rest = size // chunk[axis]
        fits = max(1, min(chunk[axis], target_bytes // max(1, rest)))
        count = -(-chunk[axis] // fits)
        chunk[axis] = -(-chunk[axis] // count)  # equal chunks: zarr stores the last one padded to full size
    return tuple(chunk)


def _chunk_indices(shape: Sequence[int], chunk: Sequence[int]) -> list[tuple[slice, ...]]:
    """Every chunk's index (one slice per axis), in C order."""
    grids = [range(0, n, c) for n, c in zip(shape, chunk, strict=True)]
    out: list[tuple[slice, ...]] = [()]
    for grid, c, n in zip(grids, chunk, shape, strict=True):
        out = [index + (slice(s, min(s + c, n)),) for index in out for s in grid]
    return out


class OrbaxTreeWriter:
    """Writes an Orbax tree {"params", "buffers"} leaf by leaf, chunk by chunk; `finish()` writes the
    tree metadata (a tree without it is not restorable)."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._leaves: list[tuple[str, ...]] = []
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})

    def write_leaf(self, keys: tuple[str, ...], shape: tuple[int, ...], dtype: np.dtype,
                   read: Callable[[Index], np.ndarray], split_order: Sequence[int],
                   on_block: Callable[[int], None] | None = None) -> None:
        """Create the leaf's array and fill it chunk by chunk from `read(index)` (cast to `dtype`); the
        write of one chunk overlaps the read of the next (at most two chunks in memory)."""
        dtype = np.dtype(dtype)
        chunks = chunk_shape(shape, dtype.itemsize, split_order)
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(self.directory, ".".join(keys))},
                "metadata": {"shape": list(shape), "chunks": list(chunks), "compressor": None, "order": "C"}}
        array = ts.open(spec, create=True, dtype=ts.dtype(dtype.name), context=self._context).result()
        pending: Future | None = None
        for index in _chunk_indices(shape, chunks):
            region = tuple(item.stop - item.start for item in index)
            block = np.ascontiguousarray(np.asarray(read(index)).astype(dtype, copy=False)).reshape(region)
            if pending is not None:
                pending.result()
            pending = array[index].write(block) if shape else array.write(block)
            if on_block is not None:
                on_block(block.nbytes)
        if pending is not None:
            pending.result()
        self._leaves.append(keys)

    def finish(self, collections: Sequence[str] = ("params", "buffers")) -> None:
        """Write `_METADATA` (every leaf written, and each collection without leaves as an empty dict)."""
        tree: dict[str, Any] = {}
        for keys in self._leaves:
            tree[str(keys)] = {"key_metadata": [{"key": k, "key_type": 2} for k in keys],
                               "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False}}
        for collection in collections:
            if not any(keys[0] == collection for keys in self._leaves):
                tree[str((collection,))] = {"key_metadata": [{"key": collection, "key_type": 2}],
                                            "value_metadata": {"value_type": "Dict", "skip_deserialize": True}}
        payload = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
                   "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        with open(os.path.join(self.directory, METADATA_FILE), "w") as f:
            json.dump(payload, f)


class OrbaxLeaves:
    """Blocks of the leaves of an Orbax tree on disk (a `LeafSource` for `hf_shards.write_shards`)."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        path = os.path.join(self.directory, METADATA_FILE)
        try:
            with open(path) as f:
                meta = json.load(f)
            self._ocdbt, self._zarr3 = bool(meta.get("use_ocdbt", True)), bool(meta.get("use_zarr3", False))
        except (OSError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: cannot read the Orbax tree metadata ({e})") from e
        self._arrays: dict[str, ts.TensorStore] = {}
        # Consecutive row blocks often share a chunk: keep a few decoded chunks rather than read them twice.
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 4 * CHUNK_BYTES}})

    def _array(self, collection: str, path: Path) -> ts.TensorStore:
        name = leaf_name(collection, path)
        if name not in self._arrays:
            if self._ocdbt:
                kvstore = {"driver": "ocdbt", "base": f"file://{self.directory}", "path": name}
            else:
                kvstore = {"driver": "file", "path": os.path.join(self.directory, name)}
            try:
                self._arrays[name] = ts.open({"driver": "zarr3" if self._zarr3 else "zarr", "kvstore": kvstore},
                                             open=True, context=self._context).result()
            except ValueError as e:
                raise CheckpointError(f"{self.directory}: leaf {name} is missing or unreadable ({e})") from e
        return self._arrays[name]

    def shape(self, collection: str, path: Path) -> tuple[int, ...]:
        return tuple(self._array(collection, path).shape)

    def dtype(self, collection: str, path: Path) -> np.dtype:
        return np.dtype(self._array(collection, path).dtype.numpy_dtype)

    def read(self, collection: str, path: Path, index: Index) -> np.ndarray:
        array = self._array(collection, path)
        try:
            if any(isinstance(item, np.ndarray) for item in index):
                return np.asarray(array.oindex[tuple(index)].read().result())
            return np.asarray(array[tuple(index)].read().result())
        except ValueError as e:
            raise CheckpointError(f"{self.directory}: leaf {leaf_name(collection, path)}: cannot read {index} "
                                  f"({e})") from e
