"""A ModelOpt (NVFP4 / FP8) checkpoint seen as the float checkpoint it dequantises to, read row by row.

`DequantizedFiles` wraps a `SafetensorsDir` for the conversion's `--dtype bfloat16|float32`: a quantized
module's `X.weight` reads as the float32 [N, K] weight the quantized model computes with
(`quant.ptq.dequantize_tensors`, the one dequantisation), its scales and the KV-cache scales are gone,
and every other tensor is the file's. Only the rows a block asks for are dequantised (NVFP4 block scales
follow the weight's rows; FP8 and global scales are per tensor), so memory holds one block, as for
float tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from nemojax.checkpoint.safetensors_io import SafetensorsDir
from nemojax.quant.modelopt import QuantScheme
from nemojax.quant.ptq import dequantize_tensors


def _scalar(value: Any) -> np.ndarray:
    """A per-tensor scale as a 0-d float32 array (some exporters store it as [1])."""
    return np.asarray(value, np.float32).reshape(())


class _DequantizedWeight:
    """Lazy float32 [N, K] view of one quantized weight: `view[rows, cols]` dequantises only `rows`."""

    def __init__(self, files: SafetensorsDir, name: str, fmt: str):
        self.files, self.name, self.fmt, self.module = files, name, fmt, name.removesuffix(".weight")
        self.scheme = QuantScheme({self.module: fmt})
        n, k = files.shape(name)
        self.shape = (n, 2 * k if fmt == "nvfp4" else k)

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        rows, rest = index[0], index[1:]
        if np.ndim(rows) == 0 and not isinstance(rows, slice):  # one row: dequantise it as a [1, K] block
            return self[(slice(int(rows), int(rows) + 1),) + rest][0]
        scales = {f"{self.module}.weight_scale": self.files.read(f"{self.module}.weight_scale")}
        if self.fmt == "nvfp4":
            scales[f"{self.module}.weight_scale"] = np.asarray(scales[f"{self.module}.weight_scale"][rows])
            scales[f"{self.module}.weight_scale_2"] = _scalar(self.files.read(f"{self.module}.weight_scale_2"))
        else:
            scales[f"{self.module}.weight_scale"] = _scalar(scales[f"{self.module}.weight_scale"])
        tensors = {self.name: np.asarray(self.files.read(self.name)[rows]), **scales}
        block = dequantize_tensors(tensors, self.scheme)[self.name]
        return block[(slice(None),) + rest]


class DequantizedFiles:
    """The tensors of a quantized checkpoint directory as float ones (see the module docstring)."""

    def __init__(self, files: SafetensorsDir, scheme: QuantScheme):
        self.files, self.scheme = files, scheme
        self.directory = files.directory
        self._weights = {f"{m}.weight": fmt for m, fmt in scheme.formats.items()}

    def keys(self) -> Iterator[str]:
        return (key for key in self.files.keys() if key in self)

    def __contains__(self, key: str) -> bool:
        module = key.rsplit(".", 1)[0]
        if key.endswith((".k_scale", ".v_scale")) and self.scheme.kv_cache is not None:
            return False
        return key in self.files and not (module in self.scheme.formats and key not in self._weights)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._weights:
            return _DequantizedWeight(self.files, key, self._weights[key]).shape
        return self.files.shape(key)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(np.float32) if key in self._weights else self.files.dtype(key)

    def file_of(self, key: str) -> str:
        return self.files.file_of(key)

    def read(self, key: str) -> Any:
        if key in self._weights:
            return _DequantizedWeight(self.files, key, self._weights[key])
        return self.files.read(key)

