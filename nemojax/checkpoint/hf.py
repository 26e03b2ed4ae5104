"""The published Hugging Face layout of Nemotron-H checkpoints, as one table.

`published_tensors(config)` maps every published tensor name to where it lives in the nemojax
variables and how it is laid out there (linear weights transposed to [in, out], conv weights to
[kernel, channels], per-expert tensors stacked on a leading expert axis, the fused Mamba in_proj
outputs and conv channels reordered group-major; with scanned layers, each layer a row of its
kind's stacked leaf). Loading and saving are both driven by that table, so the two can never
disagree, and the files are the same whichever layout the model uses in memory.

ModelOpt checkpoints (NVFP4 / FP8, `nemojax.quant.modelopt`) use the same table: a linear the config
lists in `weight_formats` contributes its `weight`, `weight_scale`, `weight_scale_2` and `input_scale`
tensors instead of a float weight (held in their own dtypes, never cast), and an FP8 KV cache adds
`k_scale` / `v_scale` under the attention module (also read from under k_proj / v_proj).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.checkpoint import orbax
from nemojax.checkpoint.hf_shards import (
    DEFAULT_MAX_SHARD_SIZE,
    ArrayLeaves,
    output_tensors,
    tensor_blocks,
    write_shards,
)
from nemojax.checkpoint.placement import Path, Placement, leaf_reader, published_shape
from nemojax.checkpoint.safetensors_io import SafetensorsDir
from nemojax.config import ModelConfig, dtype_name, from_hf_config, read_hf_config, storage_dtype, to_hf_dict
from nemojax.config.model_config import SCAN_LAYERS_FROM, nonuniform_formats
from nemojax.errors import CheckpointError
from nemojax.model import NemotronH, abstract_variables
from nemojax.model.mamba import conv_order, in_proj_order
from nemojax.model.stacking import LAYERS_NAME, stack_plan
from nemojax.quant import modelopt
from nemojax.sharding.placement import variable_shardings

DTypeLike = str | np.dtype | type


_NVFP4_SCALES = ("weight_scale", "weight_scale_2", "input_scale")
_FLOAT_STORAGE = ("float16", "bfloat16", "float32", "float64")  # tensors loaded by casting to param_dtype
_FP8_SCALES = ("weight_scale", "input_scale")


def _linear_tensors(config: ModelConfig, module: str, path: Path, key: str,
                    order: np.ndarray | None = None) -> Iterator[tuple[str, Placement]]:
    """The tensors of one linear (published module name `module`, nemojax module path `path`, weight key
    `key` in `config.weight_formats`) in its format."""
    fmt = config.weight_format(key)
    if fmt is None:
        yield f"{module}.weight", Placement("params", path + ("kernel",), "transpose", order=order)
        return
    if fmt == "fp8":
        yield f"{module}.weight", Placement("params", path + ("kernel",), "transpose", order=order, fmt=fmt)
    else:
        yield f"{module}.weight", Placement("params", path + ("weight",), "same", order=order, fmt=fmt)
    for scale in _FP8_SCALES if fmt == "fp8" else _NVFP4_SCALES:
        rows = order if scale == "weight_scale" and fmt == "nvfp4" else None  # NVFP4 block scales follow the rows
        yield f"{module}.{scale}", Placement("params", path + (scale,), "same", order=rows, fmt=fmt)


def _expert_tensors(config: ModelConfig, prefix: str, path: Path, key: str) -> Iterator[tuple[str, Placement]]:
    """Per-expert published tensors stacked into the experts' leaves (path / key: the Experts module)."""
    for proj in ("up_proj", "down_proj"):
        fmt = config.weight_format(f"{key}/{proj}")
        for e in range(config.n_routed_experts):
            module = f"{prefix}.experts.{e}.{proj}"
            if fmt is None:
                yield f"{module}.weight", Placement("params", path + (proj,), "expert", e)
                continue
            if fmt == "fp8":
                yield f"{module}.weight", Placement("params", path + (proj,), "expert", e, fmt=fmt)
            else:
                yield f"{module}.weight", Placement("params", path + (f"{proj}_weight",), "expert_same", e, fmt=fmt)
            for scale in _FP8_SCALES if fmt == "fp8" else _NVFP4_SCALES:
                yield f"{module}.{scale}", Placement("params", path + (f"{proj}_{scale}",), "expert_same", e, fmt=fmt)


def _mixer_tensors(config: ModelConfig, kind: str, prefix: str, path: Path,
                   key: str) -> Iterator[tuple[str, Placement]]:
    """A mixer's tensors: `path` where its variables are, `key` its weights' prefix in weight_formats (the
    per-layer path "backbone/layers_3/mixer", whichever layout the variables use)."""
    def linear(name: str, *sub: str, order: np.ndarray | None = None):
        return _linear_tensors(config, f"{prefix}.{name}", path + sub, "/".join((key,) + sub), order)

    def plain(name: str, *sub: str, collection: str = "params"):
        return f"{prefix}.{name}", Placement(collection, path + sub, "same")

    if kind == "mamba":
        columns, channels = in_proj_order(config), conv_order(config)
        yield from linear("in_proj", "in_proj", order=columns)
        yield f"{prefix}.conv1d.weight", Placement("params", path + ("conv1d", "weight"), "conv", order=channels)
        if config.use_conv_bias:
            yield f"{prefix}.conv1d.bias", Placement("params", path + ("conv1d", "bias"), "same", order=channels)
        for name in ("A_log", "D", "dt_bias"):
            yield plain(name, name)
        yield plain("norm.weight", "norm", "weight")
        yield from linear("out_proj", "out_proj")
    elif kind == "attention":
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield from linear(name, name)
        if config.kv_cache_quant == "fp8":
            for kv in ("k", "v"):
                yield f"{prefix}.{kv}_scale", Placement("params", path + (f"{kv}_scale",), "same", fmt="fp8",
                                                        aliases=(f"{prefix}.{kv}_proj.{kv}_scale",))
    elif kind == "mlp":
        yield from linear("up_proj", "up_proj")
        yield from linear("down_proj", "down_proj")
    elif kind == "moe":
        yield f"{prefix}.gate.weight", Placement("params", path + ("gate", "kernel"), "transpose")
        yield plain("gate.e_score_correction_bias", "gate", "e_score_correction_bias", collection="buffers")
        yield from _expert_tensors(config, prefix, path + ("experts",), f"{key}/experts")
        yield from linear("shared_experts.up_proj", "shared_experts", "up_proj")
        yield from linear("shared_experts.down_proj", "shared_experts", "down_proj")
        if config.moe_latent_size is not None:
            yield from linear("fc1_latent_proj", "fc1_latent_proj")
            yield from linear("fc2_latent_proj", "fc2_latent_proj")


def published_tensors(config: ModelConfig) -> dict[str, Placement]:
    """Every tensor name of the published layout for this config, and its place in the variables."""
    table: dict[str, Placement] = {
        "backbone.embeddings.weight": Placement("params", ("backbone", "embeddings", "weight"), "same"),
        "backbone.norm_f.weight": Placement("params", ("backbone", "norm_f", "weight"), "same"),
    }
    table.update(_linear_tensors(config, "lm_head", ("lm_head",), "lm_head"))
    slots = stack_plan(config).slots
    for i, kind in enumerate(config.layer_types):
        path, layer = (("backbone", LAYERS_NAME, kind), int(slots[i])) if config.scan_layers else (
            ("backbone", f"{LAYERS_NAME}_{i}"), -1)
        tensors = {f"backbone.layers.{i}.norm.weight": Placement("params", path + ("norm", "weight"), "same")}
        tensors.update(_mixer_tensors(config, kind, f"backbone.layers.{i}.mixer", path + ("mixer",),
                                      f"backbone/{LAYERS_NAME}_{i}/mixer"))
        table.update({name: dataclasses.replace(p, layer=layer) for name, p in tensors.items()})
    if config.has_mtp:
        last = len(config.mtp_layer_types) - 1
        for i, kind in enumerate(config.mtp_layer_types):
            path = ("mtp", f"layers_{i}")
            if i == 0:
                for name in ("enorm", "hnorm"):
                    table[f"mtp.layers.{i}.{name}.weight"] = Placement("params", path + (name, "weight"), "same")
                table.update(_linear_tensors(config, f"mtp.layers.{i}.eh_proj", path + ("eh_proj",),
                                             "/".join(path + ("eh_proj",))))
            table[f"mtp.layers.{i}.norm.weight"] = Placement("params", path + ("block", "norm", "weight"), "same")
            table.update(_mixer_tensors(config, kind, f"mtp.layers.{i}.mixer", path + ("block", "mixer"),
                                        "/".join(path + ("block", "mixer"))))
            if i == last:
                table[f"mtp.layers.{i}.final_layernorm.weight"] = Placement(
                    "params", path + ("final_layernorm", "weight"), "same")
    return table


def quantizable_modules(config: ModelConfig) -> list[str]:
    """Published names of the modules a ModelOpt checkpoint may quantize: every linear (each expert's
    projections apart), the MoE routers excepted (ModelOpt leaves them in float)."""
    table = published_tensors(config.replace(weight_formats=(), scan_layers=False))
    return [name.removesuffix(".weight") for name, p in table.items()
            if p.layout in ("transpose", "expert") and not name.endswith(".mixer.gate.weight")]


def _leaf(tree: Any, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set_leaf(tree: dict, path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _stored_names(st: SafetensorsDir, table: dict[str, Placement]) -> dict[str, str]:
    """Table name -> the name the checkpoint stores it under (the name itself or an alias), if present."""
    found = {}
    for name, p in table.items():
        stored = next((n for n in (name, *p.aliases) if n in st), None)
        if stored is not None:
            found[name] = stored
    return found


def _check_tensors(st: SafetensorsDir, table: dict[str, Placement], abstract: dict, stored: dict[str, str]) -> None:
    """One CheckpointError naming every missing, unexpected, mis-shaped and mis-typed tensor."""
    missing = sorted(k for k in table if k not in stored)
    unexpected = sorted(f"{k} (in {os.path.basename(st.file_of(k))})" for k in set(st.keys()) - set(stored.values()))
    misshaped, mistyped = [], []
    for name, placement in table.items():
        if name not in stored:
            continue
        leaf = _leaf(abstract[placement.collection], placement.path)
        want, got = tuple(published_shape(placement, leaf.shape)), tuple(st.shape(stored[name]))
        where = f" (in {os.path.basename(st.file_of(stored[name]))})"
        if got != want and not (want == () and got == (1,)):  # some exporters write scalars as [1]
            misshaped.append(f"{stored[name]}: {got}, expected {want}{where}")
        dtype = st.dtype(stored[name])
        if placement.quantized and dtype != leaf.dtype:
            mistyped.append(f"{stored[name]}: {dtype}, expected {np.dtype(leaf.dtype)}{where}")
        elif not placement.quantized and dtype.name not in _FLOAT_STORAGE:
            mistyped.append(f"{stored[name]}: {dtype}, expected a float tensor (quantized tensors need a ModelOpt "
                            f"quantization config that lists the module){where}")
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                         ("mis-typed", mistyped)):
        if items:
            problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
    if problems:
        raise CheckpointError(f"{st.directory} does not match the model config:\n" + "\n".join(problems))


def checked_sources(st: SafetensorsDir, config: ModelConfig,
                    abstract: dict) -> dict[tuple[str, Path], list[tuple[str, Placement]]]:
    """(collection, leaf path) -> (stored name, placement) of each published tensor of that leaf, in table
    order, after checking the files hold exactly the config's tensors (one CheckpointError naming them all)."""
    table = published_tensors(config)
    stored = _stored_names(st, table)
    _check_tensors(st, table, abstract, stored)
    grouped: dict[tuple[str, Path], list[tuple[str, Placement]]] = {}
    for name, placement in table.items():
        grouped.setdefault((placement.collection, placement.path), []).append((stored[name], placement))
    return grouped


def load_variables(directory: str, config: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> dict:
    """Read every published tensor into nemojax variables (sharded straight onto `mesh` if given)."""
    st = SafetensorsDir(directory)
    abstract = abstract_variables(config)
    grouped = checked_sources(st, config, abstract)
    shardings = None
    if mesh is not None:
        shardings = variable_shardings(config, mesh)
    variables: dict = {}
    for (collection, path), sources in grouped.items():
        spec = _leaf(abstract[collection], path)
        read = leaf_reader(st, sources, spec.shape)
        full = tuple(slice(None) for _ in spec.shape)
        if shardings is None:
            value = jnp.asarray(read(full).astype(spec.dtype))
        else:
            value = jax.make_array_from_callback(
                spec.shape, _leaf(shardings[collection], path), lambda idx, r=read, d=spec.dtype: r(idx).astype(d))
        _set_leaf(variables.setdefault(collection, {}), path, value)
    return variables


def read_model_config(path: str | os.PathLike, dtype: DTypeLike | None = None, param_dtype: DTypeLike | None = None,
                      scan_layers: bool | None = None) -> ModelConfig:
    """The ModelConfig of a checkpoint directory in the published layout (config.json and any ModelOpt
    quantization config), with the dtypes and layer layout `load_pretrained` gives it."""
    directory = os.fspath(path)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(f"{directory}: no config.json (expected a Hugging Face checkpoint directory)")
    hf = read_hf_config(directory)
    param_dtype = dtype_name(param_dtype) if param_dtype is not None else storage_dtype(hf)
    compute_dtype = dtype_name(dtype) if dtype is not None else param_dtype
    config = from_hf_config(directory, compute_dtype=compute_dtype, param_dtype=param_dtype,  # warnings name the file
                            scan_layers=False if scan_layers is None else scan_layers)
    block, source = modelopt.read_quant_config(directory)
    if block is not None:
        fields = quant_fields(config, modelopt.parse_scheme(block, quantizable_modules(config), source), source)
        mixed = nonuniform_formats(config.layer_types, fields["weight_formats"])
        if mixed and scan_layers:
            raise CheckpointError(f"{source}: scanned layers need one format per weight across the layers of a "
                                  f"kind (load with scan_layers=False): {mixed}")
        config = config.replace(**fields)
    if scan_layers is None:  # the default depth rule, unless the formats differ between layers of a kind
        config = config.replace(scan_layers=len(config.layer_types) >= SCAN_LAYERS_FROM
                                and not nonuniform_formats(config.layer_types, config.weight_formats))
    return config


def load_pretrained(path: str | os.PathLike, dtype: DTypeLike | None = None, param_dtype: DTypeLike | None = None,
                    mesh: jax.sharding.Mesh | None = None, scan_layers: bool | None = None) -> tuple[NemotronH, dict]:
    """Load a checkpoint directory in the published layout, float or ModelOpt-quantized: (model, variables).

    `param_dtype` defaults to the checkpoint's storage dtype, `dtype` (compute) to the parameter dtype;
    both accept names or numpy/JAX dtypes. `scan_layers` None: scanned from 16 layers on (ModelConfig),
    unless the quantization formats differ between layers of one kind. Missing, unexpected, mis-shaped or
    mis-typed tensors raise one CheckpointError that lists them all (unsupported quantization configs
    one that names every problem). A nemojax model directory (`python -m nemojax.convert hf-to-orbax`), training
    workdir or step directory is read with `checkpoint.orbax.load_model` instead.
    """
    if orbax.is_nemojax_dir(os.fspath(path)):
        return orbax.load_model(path, dtype=None if dtype is None else dtype_name(dtype),
                                param_dtype=None if param_dtype is None else dtype_name(param_dtype), mesh=mesh,
                                scan_layers=scan_layers)
    config = read_model_config(path, dtype, param_dtype, scan_layers)
    return NemotronH(config), load_variables(os.fspath(path), config, mesh)


def quant_fields(config: ModelConfig, scheme: modelopt.QuantScheme, source: str) -> dict[str, Any]:
    """ModelConfig fields (weight_formats, kv_cache_quant) of a scheme over published module names; the
    experts of one layer's projection must share a format (they are one stacked leaf)."""
    table = published_tensors(config.replace(weight_formats=(), scan_layers=False))  # keys: per-layer paths
    by_leaf: dict[str, dict[str, str]] = {}
    for module, fmt in scheme.formats.items():
        p = table[f"{module}.weight"]
        by_leaf.setdefault("/".join(p.path if p.layout == "expert" else p.path[:-1]), {})[module] = fmt
    problems = []
    for key, members in by_leaf.items():
        if key.endswith(("/experts/up_proj", "/experts/down_proj")):
            if len(set(members.values())) > 1 or len(members) != config.n_routed_experts:
                problems.append(f"{key}: its {config.n_routed_experts} experts must share one format, got "
                                f"{dict(sorted(collections.Counter(members.values()).items()))} "
                                f"({config.n_routed_experts - len(members)} unquantized)")
    if problems:
        raise CheckpointError(f"{source}: unsupported quantization config:\n  " + "\n  ".join(problems))
    formats = tuple((key, next(iter(members.values()))) for key, members in by_leaf.items())
    return {"weight_formats": formats, "kv_cache_quant": scheme.kv_cache or "none"}


def quant_scheme(config: ModelConfig) -> modelopt.QuantScheme:
    """The published-name QuantScheme of a config's weight_formats / kv_cache_quant (the inverse of loading)."""
    formats = {name.removesuffix(".weight"): p.fmt for name, p in published_tensors(config).items()
               if p.fmt is not None and name.endswith(".weight")}
    return modelopt.QuantScheme(formats, None if config.kv_cache_quant == "none" else config.kv_cache_quant)


def to_published(config: ModelConfig, variables: dict, dtype: DTypeLike | None = None) -> dict[str, np.ndarray]:
    """The published tensors (numpy) of nemojax variables; `dtype` casts floating tensors except fp32-kept ones
    and quantized ones (which keep their own dtypes)."""
    leaves = ArrayLeaves(variables)
    out = {}
    for tensor in output_tensors(published_tensors(config), leaves, None if dtype is None else dtype_name(dtype)):
        blocks = list(tensor_blocks(tensor, leaves))
        out[tensor.entry.name] = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    return out


def hf_config_dict(config: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """The config.json of a model in the published layout (with its ModelOpt quantization_config)."""
    hf = to_hf_dict(config)
    hf["torch_dtype"] = dtype or config.param_dtype
    scheme = quant_scheme(config)
    if scheme.quantized:
        hf["quantization_config"] = {"quant_method": "modelopt", **quant_block(config)}
    return hf


def quant_block(config: ModelConfig) -> dict[str, Any]:
    """The ModelOpt `quantization` block of a quantized config (hf_quant_config.json's, config.json's)."""
    return modelopt.scheme_to_config(quant_scheme(config), quantizable_modules(config))


def save_pretrained(path: str | os.PathLike, config: ModelConfig, variables: dict, dtype: DTypeLike | None = None,
                    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write config.json and the safetensors in the published layout (readable by transformers): one
    model.safetensors, or shards of at most `max_shard_size` bytes and an index. A quantized model also gets
    its ModelOpt quantization config (in config.json and hf_quant_config.json).

    The variables may be sharded, also over several hosts (call this on every process; process 0 writes):
    tensors are gathered and written one block at a time, never the whole model on one host."""
    directory = os.fspath(path)
    dtype = None if dtype is None else dtype_name(dtype)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(directory, exist_ok=True)
        hf = hf_config_dict(config, dtype)
        if "quantization_config" in hf:
            modelopt.write_quant_config(directory, quant_block(config), "nemojax")
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
    leaves = ArrayLeaves(variables)
    write_shards(directory, output_tensors(published_tensors(config), leaves, dtype), leaves, max_shard_size,
                 is_writer=writer)
