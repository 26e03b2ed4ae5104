"""ModelOpt (NVFP4 / FP8) tensors dequantised to the float checkpoint they stand for, row block by row block.

`DequantizedFiles` wraps a `SafetensorsDir` for the conversion's `--dtype bfloat16|float32`: a quantized
module's `X.weight` reads as the float32 [N, K] weight the quantized model computes with
(`quant.ptq.dequantize_tensors`, the one dequantisation), its scales and the KV-cache scales are gone,
and every other tensor is the file's. Only the rows a block asks for are dequantised (NVFP4 block scales
follow the weight's rows; FP8 and global scales are per tensor), so memory holds one block, as for
float tensors.

`dequantized_outputs` does the same for orbax-to-hf: the published float tensors of a quantized model's
leaves (an Orbax tree), each quantized weight written as float row blocks made from the rows of its
packed weight and scales.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from nemojax.checkpoint.hf import published_tensors, quant_scheme
from nemojax.checkpoint.hf_shards import BLOCK_BYTES, LeafSource, OutputTensor, output_tensors, tensor_blocks
from nemojax.checkpoint.placement import published_block, published_shape
from nemojax.checkpoint.safetensors_io import SafetensorsDir, TensorEntry
from nemojax.config import ModelConfig
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



def float_config(config: ModelConfig) -> ModelConfig:
    """The float model of a quantized config's architecture (what dequantising gives)."""
    return config.replace(weight_formats=(), kv_cache_quant="none")


def dequantized_outputs(config: ModelConfig, leaves: LeafSource, dtype: str,
                        records: Mapping[str, Mapping[str, Any]] | None = None
                        ) -> tuple[list[OutputTensor], Callable[[OutputTensor, LeafSource], Iterator[np.ndarray]]]:
    """The published tensors of the float model of quantized `config` (whose leaves `leaves` holds), in
    `dtype` (float32-kept tensors excepted, as `output_tensors`), and the `read_blocks` for `write_shards`."""
    table = published_tensors(config)
    weights = {f"{m}.weight": fmt for m, fmt in quant_scheme(config).formats.items()}
    names = list(published_tensors(float_config(config)))  # the quantized table less the scales
    plain = [name for name in names if name not in weights]
    by_name = dict(zip(plain, output_tensors({name: table[name] for name in plain}, leaves, dtype, records),
                       strict=True))
    out = []
    for name in names:
        p = table[name]
        if name not in weights:
            out.append(by_name[name])
            continue
        n, k = published_shape(p, leaves.shape(p.collection, p.path))
        shape = (n, 2 * k if weights[name] == "nvfp4" else k)
        out.append(OutputTensor(TensorEntry(name, np.dtype(jnp.dtype(dtype)), shape), p))

    def rows_of(module: str, suffix: str, rows: slice) -> np.ndarray:
        q = table[module + suffix]
        read = functools.partial(leaves.read, q.collection, q.path)
        return published_block(q, read, leaves.shape(q.collection, q.path), rows)

    def read_blocks(tensor: OutputTensor, source: LeafSource) -> Iterator[np.ndarray]:
        name = tensor.entry.name
        if name not in weights:  # a float tensor (the quantized weights keep their published names)
            yield from tensor_blocks(tensor, source)
            return
        module, fmt = name.removesuffix(".weight"), weights[name]
        scheme = QuantScheme({module: fmt})
        step = max(1, BLOCK_BYTES // (4 * math.prod(tensor.entry.shape[1:])))
        for start in range(0, tensor.entry.shape[0], step):
            rows = slice(start, start + step)
            tensors = {name: rows_of(module, ".weight", rows),
                       f"{module}.weight_scale": rows_of(module, ".weight_scale", rows)}
            if fmt == "nvfp4":
                tensors[f"{module}.weight_scale_2"] = rows_of(module, ".weight_scale_2", rows)
            yield dequantize_tensors(tensors, scheme)[name].astype(tensor.entry.dtype)

    return out, read_blocks
