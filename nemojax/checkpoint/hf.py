"""The published Hugging Face layout of Nemotron-H checkpoints, as one table.

`published_tensors(config)` maps every published tensor name to where it lives in the nemojax
variables and how it is laid out there (linear weights transposed to [in, out], conv weights to
[kernel, channels], per-expert tensors stacked on a leading expert axis, the fused Mamba in_proj
outputs and conv channels reordered group-major). Loading and saving are both driven by that
table, so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.checkpoint.safetensors_io import SafetensorsDir, save_file
from nemojax.config import ModelConfig, dtype_name, from_hf_config, read_hf_config, storage_dtype, to_hf_dict
from nemojax.errors import CheckpointError
from nemojax.model import NemotronH, abstract_variables
from nemojax.model.mamba import conv_order, in_proj_order
from nemojax.sharding.placement import variable_shardings

Path = tuple[str, ...]
DTypeLike = str | np.dtype | type


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one published tensor goes: collection + path of the leaf, layout, expert index."""

    collection: str
    path: Path
    layout: str  # "same" | "transpose" | "conv" | "expert"
    expert: int = -1
    # order[j] = the published index (output row / channel) stored at nemojax index j; None = as published.
    order: np.ndarray | None = dataclasses.field(default=None, compare=False)


def _mixer_tensors(config: ModelConfig, kind: str, prefix: str, path: Path) -> Iterator[tuple[str, Placement]]:
    def linear(name: str, *sub: str):
        return f"{prefix}.{name}.weight", Placement("params", path + sub + ("kernel",), "transpose")

    def plain(name: str, *sub: str, collection: str = "params"):
        return f"{prefix}.{name}", Placement(collection, path + sub, "same")

    if kind == "mamba":
        columns, channels = in_proj_order(config), conv_order(config)
        yield f"{prefix}.in_proj.weight", Placement("params", path + ("in_proj", "kernel"), "transpose",
                                                    order=columns)
        yield f"{prefix}.conv1d.weight", Placement("params", path + ("conv1d", "weight"), "conv", order=channels)
        if config.use_conv_bias:
            yield f"{prefix}.conv1d.bias", Placement("params", path + ("conv1d", "bias"), "same", order=channels)
        for name in ("A_log", "D", "dt_bias"):
            yield plain(name, name)
        yield plain("norm.weight", "norm", "weight")
        yield linear("out_proj", "out_proj")
    elif kind == "attention":
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield linear(name, name)
    elif kind == "mlp":
        yield linear("up_proj", "up_proj")
        yield linear("down_proj", "down_proj")
    elif kind == "moe":
        yield linear("gate", "gate")
        yield plain("gate.e_score_correction_bias", "gate", "e_score_correction_bias", collection="buffers")
        for e in range(config.n_routed_experts):
            for name in ("up_proj", "down_proj"):
                yield (f"{prefix}.experts.{e}.{name}.weight",
                       Placement("params", path + ("experts", name), "expert", e))
        yield linear("shared_experts.up_proj", "shared_experts", "up_proj")
        yield linear("shared_experts.down_proj", "shared_experts", "down_proj")
        if config.moe_latent_size is not None:
            yield linear("fc1_latent_proj", "fc1_latent_proj")
            yield linear("fc2_latent_proj", "fc2_latent_proj")


def published_tensors(config: ModelConfig) -> dict[str, Placement]:
    """Every tensor name of the published layout for this config, and its place in the variables."""
    table: dict[str, Placement] = {
        "backbone.embeddings.weight": Placement("params", ("backbone", "embeddings", "weight"), "same"),
        "backbone.norm_f.weight": Placement("params", ("backbone", "norm_f", "weight"), "same"),
        "lm_head.weight": Placement("params", ("lm_head", "kernel"), "transpose"),
    }
    for i, kind in enumerate(config.layer_types):
        path = ("backbone", f"layers_{i}")
        table[f"backbone.layers.{i}.norm.weight"] = Placement("params", path + ("norm", "weight"), "same")
        table.update(_mixer_tensors(config, kind, f"backbone.layers.{i}.mixer", path + ("mixer",)))
    if config.has_mtp:
        last = len(config.mtp_layer_types) - 1
        for i, kind in enumerate(config.mtp_layer_types):
            path = ("mtp", f"layers_{i}")
            if i == 0:
                for name in ("enorm", "hnorm"):
                    table[f"mtp.layers.{i}.{name}.weight"] = Placement("params", path + (name, "weight"), "same")
                table[f"mtp.layers.{i}.eh_proj.weight"] = Placement("params", path + ("eh_proj", "kernel"),
                                                                    "transpose")
            table[f"mtp.layers.{i}.norm.weight"] = Placement("params", path + ("block", "norm", "weight"), "same")
            table.update(_mixer_tensors(config, kind, f"mtp.layers.{i}.mixer", path + ("block", "mixer")))
            if i == last:
                table[f"mtp.layers.{i}.final_layernorm.weight"] = Placement(
                    "params", path + ("final_layernorm", "weight"), "same")
    return table


def _published_shape(placement: Placement, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    if placement.layout == "transpose":
        return leaf_shape[::-1]
    if placement.layout == "conv":
        return (leaf_shape[1], 1, leaf_shape[0])
    if placement.layout == "expert":
        return leaf_shape[1:][::-1]
    return leaf_shape


def _leaf(tree: Any, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set_leaf(tree: dict, path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _check_tensors(st: SafetensorsDir, table: dict[str, Placement], abstract: dict) -> None:
    quantized = sorted(k for k in st.keys() if k.endswith(("weight_scale", "weight_scale_2", "input_scale")))
    if quantized:
        raise CheckpointError(f"{st.directory}: quantized tensors (NVFP4/FP8, e.g. {quantized[0]}) are not "
                              "supported by this loader yet; use the BF16 checkpoint")
    missing = sorted(k for k in table if k not in st)
    unexpected = sorted(k for k in st.keys() if k not in table)
    misshaped = []
    for name, placement in table.items():
        if name in st:
            want = _published_shape(placement, _leaf(abstract[placement.collection], placement.path).shape)
            if tuple(st.shape(name)) != tuple(want):
                misshaped.append(f"{name}: {tuple(st.shape(name))}, expected {tuple(want)}")
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
    if problems:
        raise CheckpointError(f"{st.directory} does not match the model config:\n" + "\n".join(problems))


def _slice_reader(st: SafetensorsDir, sources: list[tuple[str, Placement]]) -> Callable[[tuple], np.ndarray]:
    """A function index -> numpy block of the leaf, reading only the needed part of the files."""
    layout = sources[0][1].layout
    if layout == "expert":
        by_expert = {p.expert: name for name, p in sources}

        def read(index: tuple) -> np.ndarray:
            experts = range(len(by_expert))[index[0]]
            return np.stack([np.asarray(st.read(by_expert[e])[index[2], index[1]]).T for e in experts])
        return read
    name, order = sources[0][0], sources[0][1].order
    # The published rows (output dim / channels) that a slice of the nemojax dim reads.
    rows = (lambda s: s) if order is None else (lambda s: order[s])
    if layout == "transpose":
        return lambda index: np.asarray(st.read(name)[rows(index[1]), index[0]]).T
    if layout == "conv":
        return lambda index: np.asarray(st.read(name)[rows(index[1]), 0, index[0]]).T
    if order is not None:  # the conv bias (one dim)
        return lambda index: np.asarray(st.read(name)[rows(index[0])])
    return lambda index: np.asarray(st.read(name)[index])


def load_variables(directory: str, config: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> dict:
    """Read every published tensor into nemojax variables (sharded straight onto `mesh` if given)."""
    st = SafetensorsDir(directory)
    table = published_tensors(config)
    abstract = abstract_variables(config)
    _check_tensors(st, table, abstract)
    shardings = None
    if mesh is not None:
        shardings = variable_shardings(config, mesh)
    grouped: dict[tuple[str, Path], list[tuple[str, Placement]]] = {}
    for name, placement in table.items():
        grouped.setdefault((placement.collection, placement.path), []).append((name, placement))
    variables: dict = {}
    for (collection, path), sources in grouped.items():
        spec = _leaf(abstract[collection], path)
        read = _slice_reader(st, sources)
        full = tuple(slice(None) for _ in spec.shape)
        if shardings is None:
            value = jnp.asarray(read(full).astype(spec.dtype))
        else:
            value = jax.make_array_from_callback(
                spec.shape, _leaf(shardings[collection], path), lambda idx, r=read, d=spec.dtype: r(idx).astype(d))
        _set_leaf(variables.setdefault(collection, {}), path, value)
    return variables


def load_pretrained(path: str | os.PathLike, dtype: DTypeLike | None = None, param_dtype: DTypeLike | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> tuple[NemotronH, dict]:
    """Load a checkpoint directory in the published layout: (model, variables).

    `param_dtype` defaults to the checkpoint's storage dtype, `dtype` (compute) to the parameter dtype;
    both accept names or numpy/JAX dtypes. Missing, unexpected or mis-shaped tensors raise one
    CheckpointError that lists them all.
    """
    directory = os.fspath(path)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(f"{directory}: no config.json (expected a Hugging Face checkpoint directory)")
    hf = read_hf_config(directory)
    param_dtype = dtype_name(param_dtype) if param_dtype is not None else storage_dtype(hf)
    compute_dtype = dtype_name(dtype) if dtype is not None else param_dtype
    config = from_hf_config(hf, compute_dtype=compute_dtype, param_dtype=param_dtype)
    return NemotronH(config), load_variables(directory, config, mesh)


def to_published(config: ModelConfig, variables: dict, dtype: DTypeLike | None = None) -> dict[str, np.ndarray]:
    """The published tensors (numpy) of nemojax variables; `dtype` casts floating tensors except fp32-kept ones."""
    out = {}
    for name, p in published_tensors(config).items():
        leaf = np.asarray(jax.device_get(_leaf(variables[p.collection], p.path)))
        if p.layout == "transpose":
            value = leaf.T
        elif p.layout == "conv":
            value = leaf.T[:, None, :]
        elif p.layout == "expert":
            value = leaf[p.expert].T
        else:
            value = leaf
        if p.order is not None:  # back to the published order along the first (output / channel) dim
            value = value[np.argsort(p.order)]
        keep_fp32 = p.collection == "buffers" or name.endswith("gate.weight")
        if dtype is not None and not keep_fp32:
            value = value.astype(jnp.dtype(dtype))
        out[name] = np.ascontiguousarray(value)
    return out


def save_pretrained(path: str | os.PathLike, config: ModelConfig, variables: dict,
                    dtype: DTypeLike | None = None) -> None:
    """Write config.json and model.safetensors in the published layout (readable by transformers)."""
    directory = os.fspath(path)
    os.makedirs(directory, exist_ok=True)
    dtype = None if dtype is None else dtype_name(dtype)
    hf = to_hf_dict(config)
    hf["torch_dtype"] = dtype or config.param_dtype
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    save_file(to_published(config, variables, dtype), os.path.join(directory, "model.safetensors"))
