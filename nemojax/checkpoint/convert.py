"""Conversion between the published Hugging Face layout and nemojax model directories, streamed.

`hf_to_orbax(src, dst)` writes a nemojax model directory (what `checkpoint.orbax.load_model`,
`load_pretrained`, serve.py and train.py --init-from read):
- `config.json`: the nemojax config (model config, layout version);
- `variables/`: the Orbax tree, written leaf by leaf and chunk by chunk (`orbax_stream`), each chunk
  read from memory-mapped safetensors through the one layout table (`hf.published_tensors`);
- `hf_config.json`: SRC's config.json as it was; SRC's other files (tokenizer, chat template,
  hf_quant_config.json, ...) copied unchanged;
- `conversion.json`: the metadata record (source, quantization, nemojax version, the tensors stored
  differently from the model's natural layout: other names, dtypes, `[1]` scalars).
Float leaves keep the file's dtype (`dtype=None`) or are cast to `dtype` (router weights and the
correction bias, which the model keeps in float32, excepted). Quantized tensors stay packed with
`dtype=None`; with a `dtype` an NVFP4 / FP8 checkpoint is dequantised (`dequantized.DequantizedFiles`)
into the float model of the same architecture: no scales, no quantization in either config, no
hf_quant_config.json, `dequantized` in conversion.json. orbax-to-hf with a `dtype` does the same for
a quantized tree (`dequantized.dequantized_outputs`).

`orbax_to_hf(src, dst)` writes the published layout from a model directory, a training workdir (its
latest step) or a step directory: safetensors shards of at most `max_shard_size` bytes plus
`model.safetensors.index.json`, written a row block at a time (`hf_shards.write_shards`), config.json
(SRC's own when it was converted here) and the copied files. So HF -> Orbax -> HF gives back the same
tensors, bytes and config.json.

Both write under `DST.partial-<pid>` and rename it to DST when complete, so an interrupted conversion
leaves no DST (only the partial directory, which nothing loads); an existing DST is replaced only with
`overwrite=True`.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from nemojax.checkpoint import orbax
from nemojax.checkpoint.dequantized import DequantizedFiles, dequantized_outputs, float_config
from nemojax.checkpoint.hf import (
    checked_sources,
    hf_config_dict,
    published_tensors,
    quant_block,
    quant_scheme,
    read_model_config,
)
from nemojax.checkpoint.hf_shards import INDEX_FILE, output_tensors, write_shards
from nemojax.checkpoint.orbax_stream import OrbaxLeaves, OrbaxTreeWriter, leaf_name
from nemojax.checkpoint.placement import Placement, leaf_reader, published_shape, row_axis
from nemojax.checkpoint.safetensors_io import SafetensorsDir
from nemojax.config import ModelConfig, dtype_name
from nemojax.errors import CheckpointError, OutputError
from nemojax.model import abstract_variables
from nemojax.quant import modelopt

HF_CONFIG_FILE = "hf_config.json"
CONVERSION_FILE = "conversion.json"
# Files a training workdir may hold that belong with an exported model (a converted directory lists its own).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
Progress = Callable[[int], None]


def nemojax_version() -> str:
    try:
        return importlib.metadata.version("nemojax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_destination(src: str, dst: str, overwrite: bool) -> None:
    """CheckpointError when DST exists (without `overwrite`) or is SRC itself."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise CheckpointError(f"{dst}: the destination is the source directory; choose another")
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it")
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise CheckpointError(f"{dst} exists and is not a directory; remove it first")


@contextlib.contextmanager
def atomic_directory(dst: str) -> Iterator[str]:
    """A fresh `DST.partial-<pid>` to write into, renamed to DST (replacing it) when the block completes and
    removed when it fails; OSErrors become OutputErrors naming DST."""
    dst = os.path.abspath(dst)
    tmp = f"{dst}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        yield tmp
        old = f"{dst}.old-{os.getpid()}"
        if os.path.lexists(dst):
            os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except OSError:
            if os.path.lexists(old):
                os.rename(old, dst)  # the previous DST stays
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise OutputError(f"{dst}: cannot write the conversion ({e}); nothing was written at {dst}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _float_leaf_dtype(stored: list[np.dtype], dtype: str | None, kept: bool) -> np.dtype:
    """A float leaf's dtype: the files' (the widest, if its tensors differ) or the requested one."""
    if dtype is None or kept:
        return np.result_type(*stored)
    return np.dtype(jnp.dtype(dtype))


def _kept_in_float32(name: str, placement: Placement) -> bool:
    """Tensors the model holds in their own float dtype whatever the parameter dtype (as `output_tensors`)."""
    return placement.collection == "buffers" or name.endswith("gate.weight")


def _split_order(placement: Placement, ndim: int) -> list[int]:
    """Leaf axes to chunk, in order: the stacked axes (layers, experts), then the published rows' axis."""
    lead = (placement.layer >= 0) + (placement.layout in ("expert", "expert_same"))
    axis = row_axis(placement, ndim)
    return list(range(lead)) + ([] if axis is None else [axis])


def _copy_side_files(src: str, dst: str, names: list[str]) -> list[str]:
    copied = []
    for name in names:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def _quantization(config: ModelConfig) -> dict[str, Any] | None:
    if not config.weight_formats and config.kv_cache_quant == "none":
        return None
    counts: dict[str, int] = {}
    for _, fmt in config.weight_formats:
        counts[fmt] = counts.get(fmt, 0) + 1
    return {"weight_formats": counts, "kv_cache_quant": config.kv_cache_quant}


def _dequantized(st: Any, quantization: dict[str, Any] | None) -> dict[str, Any] | None:
    """The source's quantization when this conversion dequantised it (None: nothing was dequantised)."""
    return quantization if isinstance(st, DequantizedFiles) else None


def _progress_bar(total: int, description: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, disable=not enabled,
                dynamic_ncols=True)


def hf_to_orbax(src: str, dst: str, dtype: str | None = None, overwrite: bool = False,
                progress: bool = False) -> dict[str, Any]:
    """Convert a Hugging Face checkpoint directory to a nemojax model directory; returns a summary
    (tensors, bytes, seconds). Bad input raises CheckpointError before DST is touched."""
    check_destination(src, dst, overwrite)
    dtype = None if dtype in (None, "keep") else dtype_name(dtype)
    config = read_model_config(src, param_dtype=dtype)
    st = SafetensorsDir(src)
    abstract = abstract_variables(config)
    grouped = checked_sources(st, config, abstract)
    quantization = _quantization(config)
    if dtype is not None and quantization is not None:  # dequantise: the float model of the same architecture
        st = DequantizedFiles(st, quant_scheme(config))
        config = float_config(config)
        abstract = abstract_variables(config)
        grouped = checked_sources(st, config, abstract)
    plans, records, total = [], {}, 0
    table_by_leaf = published_tensors_by_leaf(config)
    for (collection, path), sources in grouped.items():
        spec = abstract[collection]
        for key in path:
            spec = spec[key]
        shape, first = tuple(spec.shape), sources[0][1]
        stored = [st.dtype(name) for name, _ in sources]
        if first.quantized:
            leaf_dtype = np.dtype(spec.dtype)
        else:
            kept = any(_kept_in_float32(name, p) for name, p in sources)
            leaf_dtype = _float_leaf_dtype(stored, dtype, kept)
        table_names = [name for name, _ in table_by_leaf[(collection, path)]]
        for table_name, (name, p), file_dtype in zip(table_names, sources, stored, strict=True):
            record = {}
            if name != table_name:
                record["stored_as"] = name
            if dtype is None and file_dtype != leaf_dtype:
                record["dtype"] = file_dtype.name
            if tuple(st.shape(name)) != published_shape(p, shape):
                record["shape"] = list(st.shape(name))
            if record:
                records[table_name] = record
        plans.append((collection, path, sources, shape, leaf_dtype))
        total += int(np.prod(shape, dtype=np.int64)) * leaf_dtype.itemsize
    skipped = (INDEX_FILE, "config.json") + ((modelopt.QUANT_CONFIG_FILE,) if isinstance(st, DequantizedFiles) else ())
    side_files = sorted(f for f in os.listdir(src) if os.path.isfile(os.path.join(src, f))
                        and not f.endswith(".safetensors") and f not in skipped)
    start = time.perf_counter()
    with atomic_directory(dst) as tmp, _progress_bar(total, "hf-to-orbax", progress) as bar:
        writer = OrbaxTreeWriter(os.path.join(tmp, orbax.VARIABLES_ITEM))
        for k, (collection, path, sources, shape, leaf_dtype) in enumerate(plans):
            bar.set_postfix_str(f"leaf {k + 1}/{len(plans)}", refresh=False)
            writer.write_leaf((collection, *path), shape, leaf_dtype, leaf_reader(st, sources, shape),
                              _split_order(sources[0][1], len(shape)), on_block=bar.update)
        writer.finish()
        copied = _copy_side_files(src, tmp, side_files)
        with open(os.path.join(src, "config.json")) as f:
            hf_config = json.load(f)
        if dtype is not None:
            for key in [k for k in ("torch_dtype", "dtype") if k in hf_config] or ["torch_dtype"]:
                hf_config[key] = dtype
        if isinstance(st, DequantizedFiles):
            hf_config.pop("quantization_config", None)
        with open(os.path.join(tmp, HF_CONFIG_FILE), "w") as f:
            json.dump(hf_config, f, indent=2)
        _write_record(tmp, {"direction": "hf-to-orbax", "source": os.path.abspath(src), "dtype": dtype or "keep",
                            "quantization": _quantization(config), "dequantized": _dequantized(st, quantization),
                            "copied_files": copied, "tensors": records})
        orbax.write_config(tmp, config)
    seconds = time.perf_counter() - start
    return {"tensors": sum(len(s) for _, _, s, _, _ in plans), "leaves": len(plans), "bytes": total,
            "seconds": seconds}


def published_tensors_by_leaf(config: ModelConfig) -> dict[tuple[str, tuple[str, ...]], list[tuple[str, Placement]]]:
    """(collection, leaf path) -> (table name, placement) of its published tensors, in table order."""
    grouped: dict[tuple[str, tuple[str, ...]], list[tuple[str, Placement]]] = {}
    for name, p in published_tensors(config).items():
        grouped.setdefault((p.collection, p.path), []).append((name, p))
    return grouped


def _write_record(directory: str, fields: dict[str, Any]) -> None:
    record = {"nemojax_version": nemojax_version(),
              "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **fields}
    with open(os.path.join(directory, CONVERSION_FILE), "w") as f:
        json.dump(record, f, indent=2)


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e


def _check_tree(leaves: OrbaxLeaves, config: ModelConfig) -> None:
    """CheckpointError naming every leaf of the config the tree lacks or holds in another shape."""
    abstract = abstract_variables(config)
    problems = []
    for (collection, path) in {(p.collection, p.path) for p in published_tensors(config).values()}:
        spec = abstract[collection]
        for key in path:
            spec = spec[key]
        try:
            shape = leaves.shape(collection, path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if shape != tuple(spec.shape):
            problems.append(f"{leaves.directory}: leaf {leaf_name(collection, path)} has shape {shape}, the model "
                            f"config needs {tuple(spec.shape)}")
    if problems:
        raise CheckpointError("the Orbax tree does not match its config.json:\n" + "\n".join(sorted(problems)))


def orbax_to_hf(src: str, dst: str, max_shard_size: int, dtype: str | None = None, overwrite: bool = False,
                progress: bool = False) -> dict[str, Any]:
    """Convert a nemojax model directory / training workdir / step directory to the published layout;
    returns a summary (tensors, files, bytes, seconds)."""
    check_destination(src, dst, overwrite)
    dtype = None if dtype in (None, "keep") else dtype_name(dtype)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: no such checkpoint directory")
    config = orbax.read_model_config(src)
    home = orbax.config_dir(os.path.abspath(src))
    leaves = OrbaxLeaves(orbax.variables_paths(src)[0])
    _check_tree(leaves, config)
    record = _read_json(os.path.join(home, CONVERSION_FILE)) if os.path.isfile(
        os.path.join(home, CONVERSION_FILE)) else {}
    dequantize = dtype is not None and _quantization(config) is not None
    read_blocks = None
    if dequantize:  # the float model's tensors, each quantized weight dequantised a row block at a time
        tensors, read_blocks = dequantized_outputs(config, leaves, dtype, record.get("tensors"))
        config = float_config(config)
    else:
        tensors = output_tensors(published_tensors(config), leaves, dtype, record.get("tensors"))
    total = sum(t.entry.nbytes for t in tensors)
    if os.path.isfile(os.path.join(home, HF_CONFIG_FILE)):
        hf_config = _read_json(os.path.join(home, HF_CONFIG_FILE))
        if dtype is not None:
            for key in [k for k in ("torch_dtype", "dtype") if k in hf_config] or ["torch_dtype"]:
                hf_config[key] = dtype
        if dequantize:
            hf_config.pop("quantization_config", None)
    else:
        hf_config = hf_config_dict(config, dtype)
    side_files = [f for f in record.get("copied_files", list(TOKENIZER_FILES))
                  if not (dequantize and f == modelopt.QUANT_CONFIG_FILE)]
    start = time.perf_counter()
    with atomic_directory(dst) as tmp, _progress_bar(total, "orbax-to-hf", progress) as bar:
        files = write_shards(tmp, tensors, leaves, max_shard_size, on_block=bar.update, read_blocks=read_blocks)
        copied = _copy_side_files(home, tmp, side_files)
        if _quantization(config) is not None and modelopt.QUANT_CONFIG_FILE not in copied:
            modelopt.write_quant_config(tmp, quant_block(config), "nemojax")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
    return {"tensors": len(tensors), "files": len(files), "bytes": total, "seconds": time.perf_counter() - start}
