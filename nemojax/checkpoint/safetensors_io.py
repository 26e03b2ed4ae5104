"""Minimal safetensors reader/writer over numpy memory maps.

The `safetensors` package's numpy path cannot hold bfloat16 or float8; `ml_dtypes` can, and a memory
map lets a loader read only the slices a device needs.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

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


def _read_header(path: str) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    return header, 8 + size


class SafetensorsDir:
    """All tensors of a checkpoint directory (one file, or shards listed in model.safetensors.index.json)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        index = os.path.join(self.directory, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{self.directory}: no *.safetensors files")
        self._entries: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
        for name in files:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: listed in the index but missing")
            header, data_start = _read_header(path)
            for key, meta in header.items():
                if meta["dtype"] not in _DTYPES:
                    raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {meta['dtype']}")
                self._entries[key] = (path, _DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                      data_start + meta["data_offsets"][0])

    def keys(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][2]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][1]

    def read(self, key: str) -> np.ndarray:
        """A read-only memory-mapped view; slicing it reads only the touched bytes."""
        path, dtype, shape, offset = self._entries[key]
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape or (1,)).reshape(shape)


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy, any dtype in the table, including bfloat16/float8) as one safetensors file."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key]).reshape(np.shape(tensors[key]))  # keeps scalars 0-d
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"tensor {key}: dtype {arr.dtype} cannot be written to safetensors")
        header[key] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
