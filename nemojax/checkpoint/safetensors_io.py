"""Minimal safetensors reader/writer over numpy memory maps.

The `safetensors` package's numpy path cannot hold bfloat16 or float8; `ml_dtypes` can, and a memory
map lets a loader read only the slices a device needs. Every header entry is checked against the file's
size when it is opened, so a truncated or corrupt file is a CheckpointError naming the file and tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from nemojax.errors import CheckpointError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def _read_header(path: str) -> tuple[dict, int]:
    """The tensor entries of a file's header (checked against the file's size) and where its data starts."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            file_size = os.fstat(f.fileno()).st_size
            if size > min(MAX_HEADER_BYTES, file_size - 8):
                raise ValueError(f"header length {size} exceeds the file ({file_size} bytes)")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is not a JSON object")
    for key, meta in header.items():
        _check_entry(path, key, meta, file_size - 8 - size)
    return header, 8 + size


def _check_entry(path: str, key: str, meta: object, data_bytes: int) -> None:
    """CheckpointError naming the tensor unless its dtype, shape and byte range are consistent and in the file."""
    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {key}: {reason}")

    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
        raise bad("expected an object with dtype, shape and data_offsets")
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in _DTYPES:
        raise bad(f"unsupported dtype {meta['dtype']!r}")
    shape, offsets = meta["shape"], meta["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise bad(f"data_offsets {offsets!r} are not a range within the file's {data_bytes} data bytes (the file "
                  "may be truncated)")
    expected = math.prod(shape) * _DTYPES[meta["dtype"]].itemsize
    if offsets[1] - offsets[0] != expected:
        raise bad(f"holds {offsets[1] - offsets[0]} bytes, but {meta['dtype']} {shape} needs {expected}")


def _index_map(index: str) -> dict[str, str]:
    """The weight_map of an index.json: tensor name -> shard file (a name inside its directory)."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (OSError, ValueError, RecursionError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a readable index ({e})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: expected a \"weight_map\" object of tensor name -> shard file")
    outside = sorted(f for f in set(weight_map.values()) if os.path.basename(f) != f or f in ("", ".", ".."))
    if outside:
        raise CheckpointError(f"{index}: shard {outside[0]!r} is not a file name in the checkpoint directory")
    return weight_map


class SafetensorsDir:
    """All tensors of a checkpoint directory (one file, or shards listed in model.safetensors.index.json)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        index = os.path.join(self.directory, "model.safetensors.index.json")
        weight_map: dict[str, str] = {}
        if os.path.isfile(index):
            weight_map = _index_map(index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{self.directory}: no *.safetensors files")
        self._entries: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
        self.paths = [os.path.join(self.directory, name) for name in files]  # the safetensors files
        for name in files:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: listed in the index but missing")
            header, data_start = _read_header(path)
            for key, meta in header.items():
                if key in self._entries:
                    raise CheckpointError(f"tensor {key} is in both {self._entries[key][0]} and {path}")
                self._entries[key] = (path, _DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                      data_start + meta["data_offsets"][0])
        absent = sorted(key for key, name in weight_map.items()
                        if self._entries.get(key, ("",))[0] != os.path.join(self.directory, name))
        if absent:
            key = absent[0]
            raise CheckpointError(f"{index}: tensor {key} is listed in {weight_map[key]}, which does not hold it"
                                  + (f" ({len(absent) - 1} more such tensors)" if len(absent) > 1 else ""))

    def keys(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][2]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][1]

    def file_of(self, key: str) -> str:
        """The path of the file holding tensor `key`."""
        return self._entries[key][0]

    def read(self, key: str) -> np.ndarray:
        """A read-only memory-mapped view; slicing it reads only the touched bytes."""
        path, dtype, shape, offset = self._entries[key]
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape or (1,)).reshape(shape)


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """A tensor to be written: its name, dtype and shape (its bytes come later, in row blocks)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def write_streamed(path: str | os.PathLike, entries: Sequence[TensorEntry],
                   blocks: Callable[[TensorEntry], Iterable[np.ndarray]],
                   metadata: Mapping[str, str] | None = None) -> None:
    """Write one safetensors file whose tensors arrive block by block: the header first (from `entries`),
    then each tensor's bytes as `blocks(entry)` yields them (C-order pieces, such as row blocks), so no more
    than one block is in memory. A tensor whose blocks do not add up to its size is a CheckpointError."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for entry in entries:
        if np.dtype(entry.dtype) not in _NAMES:
            raise CheckpointError(f"tensor {entry.name}: dtype {entry.dtype} cannot be written to safetensors")
        header[entry.name] = {"dtype": _NAMES[np.dtype(entry.dtype)], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for entry in entries:
            written = 0
            for block in blocks(entry):
                block = np.ascontiguousarray(block)
                if block.dtype != np.dtype(entry.dtype):
                    raise CheckpointError(f"tensor {entry.name}: a block of dtype {block.dtype}, "
                                          f"expected {entry.dtype}")
                f.write(block.reshape(-1).view(np.uint8).data)
                written += block.nbytes
            if written != entry.nbytes:
                raise CheckpointError(f"{path}: tensor {entry.name}: {written} bytes written, {entry.nbytes} expected")


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy, any dtype in the table, including bfloat16/float8) as one safetensors file."""
    arrays = {key: np.asarray(tensors[key]) for key in sorted(tensors)}
    entries = [TensorEntry(key, arr.dtype, tuple(arr.shape)) for key, arr in arrays.items()]
    write_streamed(path, entries, lambda entry: [arrays[entry.name]], metadata)
