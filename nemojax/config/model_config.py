"""ModelConfig: the architecture and numerics of one Nemotron-H model, validated on construction.

Field defaults are the `transformers` NemotronHConfig defaults, so a published `config.json` that
leaves a field out means the same model here as there (`nemojax.config.hf.from_hf_config` falls
back to these, never to values of its own). `compute_dtype`, `param_dtype`, `remat` and `scan_layers`
are nemojax choices; a Hugging Face `dtype` / `torch_dtype` key is the storage dtype and never sets them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from nemojax.errors import ConfigError

LAYER_KINDS = ("mamba", "attention", "moe", "mlp")
PATTERN_LETTERS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots")
WEIGHT_FORMATS = ("nvfp4", "fp8")
KV_CACHE_QUANT = ("none", "fp8")
# --kv-cache-dtype choices -> the dtype the attention layers' decoding caches store K and V in.
KV_CACHE_DTYPES = {"fp8": "float8_e4m3fn", "bf16": "bfloat16", "fp32": "float32"}
TRAIN_QUANT = ("none", "nvfp4")
# "pallas": the Pallas GPU kernels, "reference": the pure-JAX ops, "auto": kernels on a GPU only
# (nemojax.ops.dispatch).
KERNEL_CHOICES = ("auto", "pallas", "reference")
# Fields that are nemojax choices, not part of a published config.json.
NEMOJAX_FIELDS = ("param_dtype", "compute_dtype", "remat", "kernels", "scan_layers", "moe_capacity_factor",
                  "weight_formats", "kv_cache_quant", "kv_cache_dtype", "train_quant", "train_quant_keep",
                  "mtp_num_depths")
# `scan_layers=None` resolves to True from this depth on (the published models: 52-108 layers).
SCAN_LAYERS_FROM = 16
MAX_MTP_DEPTHS = 8
INT32_MAX = 2**31 - 1  # token ids, positions and sizes reach the device as int32


def dtype_name(dtype: Any) -> str:
    """The canonical name of a dtype given as a string, a numpy/JAX dtype or a scalar type
    (`"bfloat16"`, `jnp.bfloat16`, `np.dtype("float32")` ...). ConfigError when it is not one."""
    try:
        return np.dtype(dtype).name
    except TypeError as e:
        raise ConfigError(f"{dtype!r} is not a dtype") from e


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of one Nemotron-H model (main stack plus MTP block)."""

    vocab_size: int
    hidden_size: int
    layer_types: tuple[str, ...]
    # Attention (GQA, no positional encoding).
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    # Mamba-2.
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # Dense MLP.
    intermediate_size: int = 21504
    # LatentMoE.
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Multi-token prediction.
    mtp_layer_types: tuple[str, ...] = ()
    num_nextn_predict_layers: int = 0
    # How many times the one MTP block is chained (shared weights): depth k predicts token t+k+1 from
    # depth k-1's output. The training loss averages the depths; Super and Ultra were trained with 2.
    mtp_num_depths: int = 1
    # Misc.
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 4096
    bos_token_id: int = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int = 0
    # Numerics and implementation choices (not part of the published config).
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat: str = "none"
    kernels: str = "auto"
    # Run the main stack as one `lax.scan` over layers (parameters and caches stacked per layer kind,
    # see nemojax/model/scanned.py). None: on for models of SCAN_LAYERS_FROM layers or more.
    scan_layers: bool | None = None
    # Expert-parallel MoE buffers: None = dropless; else each expert takes at most
    # ceil(factor * tokens * k / E) copies of a device group's tokens (see nemojax/ops/expert_parallel.py).
    moe_capacity_factor: float | None = None
    # Quantized weights (a ModelOpt checkpoint): (weight key, "nvfp4" | "fp8") for every quantized linear;
    # the key is the module path joined by "/", with the projection name for stacked experts
    # ("backbone/layers_1/mixer/experts/up_proj"). Absent modules keep param_dtype.
    weight_formats: tuple[tuple[str, str], ...] = ()
    # "fp8": attention layers hold the checkpoint's k_scale / v_scale (FP8 KV-cache scales).
    kv_cache_quant: str = "none"
    # The decoding caches' K/V dtype (a KV_CACHE_DTYPES value); None: the compute dtype. float8_e4m3fn
    # stores e4m3(x / scale) with the per-tensor k_scale / v_scale of the checkpoint (kv_cache_quant
    # "fp8"), else scale 1 (nemojax.quant.kv_cache).
    kv_cache_dtype: str | None = None
    # "nvfp4": linears train with the NVFP4 recipe (`nemojax.quant.training`), except the weight keys
    # matching a `train_quant_keep` pattern (fnmatch), which stay in the compute dtype.
    train_quant: str = "none"
    train_quant_keep: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("param_dtype", "compute_dtype"):
            value = getattr(self, name)
            if not isinstance(value, str):  # accept jnp.float32, np.dtype(...), ...: stored by name
                object.__setattr__(self, name, dtype_name(value))
        if self.scan_layers is None:
            object.__setattr__(self, "scan_layers", len(self.layer_types) >= SCAN_LAYERS_FROM)
        # JSON (nemojax checkpoints) gives lists: store hashable tuples.
        object.__setattr__(self, "weight_formats", tuple(sorted((str(k), str(v)) for k, v in self.weight_formats)))
        object.__setattr__(self, "train_quant_keep", tuple(self.train_quant_keep))
        _validate(self)

    # Derived sizes -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def mamba_inner(self) -> int:
        """Width of the Mamba inner stream (heads x head_dim); `expand` is not used."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_inner + 2 * self.n_groups * self.ssm_state_size

    @property
    def moe_expert_width(self) -> int:
        """Width the routed experts see: the latent when there is one, else the hidden size."""
        return self.moe_latent_size or self.hidden_size

    @property
    def has_mtp(self) -> bool:
        return self.num_nextn_predict_layers > 0 and len(self.mtp_layer_types) > 0

    @property
    def pattern(self) -> str:
        return kinds_to_pattern(self.layer_types)

    def weight_format(self, key: str) -> str | None:
        """"nvfp4" | "fp8" for a quantized weight key (see `weight_formats`), None for param_dtype weights."""
        return dict(self.weight_formats).get(key)

    def kind_weight_format(self, kind: str, rest: str) -> str | None:
        """The format of weight `rest` (e.g. "mixer/in_proj") in every main-stack layer of `kind`: what a
        scanned stack, one module per kind, holds (validation makes sure the layers agree)."""
        formats = {self.weight_format(f"backbone/layers_{i}/{rest}") for i, k in enumerate(self.layer_types)
                   if k == kind}
        return formats.pop() if len(formats) == 1 else None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values (the inverse of `from_dict`)."""
        out = dataclasses.asdict(self)
        for name in ("layer_types", "mtp_layer_types", "eos_token_id", "time_step_limit", "train_quant_keep"):
            out[name] = list(out[name])
        out["weight_formats"] = [list(item) for item in out["weight_formats"]]
        return out


def kinds_to_pattern(kinds: tuple[str, ...]) -> str:
    """("mamba", "moe", "attention") -> "ME*"."""
    letters = {kind: letter for letter, kind in PATTERN_LETTERS.items()}
    return "".join(letters[k] for k in kinds)


def from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Inverse of `ModelConfig.to_dict` (the "model" section of nemojax checkpoints)."""
    d = dict(d)
    if "dtype" in d and "compute_dtype" not in d:  # checkpoints written before the field was renamed
        d["compute_dtype"] = d.pop("dtype")
    d["layer_types"] = tuple(d["layer_types"])
    d["mtp_layer_types"] = tuple(d.get("mtp_layer_types", ()))
    d["eos_token_id"] = tuple(d.get("eos_token_id", (2,)))
    d["time_step_limit"] = tuple(float(x) for x in d.get("time_step_limit", (0.0, math.inf)))
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown config fields {unknown}")
    return ModelConfig(**d)


def nonuniform_formats(layer_types: tuple[str, ...], weight_formats) -> list[str]:
    """The weights whose format differs between main-stack layers of one kind (scanned layers cannot
    hold them: a kind's layers share one stacked leaf)."""
    by_weight: dict[tuple[str, str], dict[int, str]] = {}
    for key, fmt in weight_formats:
        match = re.fullmatch(r"backbone/layers_(\d+)/(.+)", key)
        if match and int(match[1]) < len(layer_types):
            by_weight.setdefault((layer_types[int(match[1])], match[2]), {})[int(match[1])] = fmt
    problems = []
    for (kind, rest), per_layer in sorted(by_weight.items()):
        count = layer_types.count(kind)
        if len(set(per_layer.values())) > 1 or len(per_layer) != count:
            problems.append(f"{rest} of the {kind} layers: {len(per_layer)} of {count} quantized, formats "
                            f"{sorted(set(per_layer.values()))}")
    return problems


def _require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config field `{field}`: {message}")


def _validate(c: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                 "chunk_size", "intermediate_size", "n_routed_experts", "num_experts_per_tok",
                 "moe_intermediate_size", "moe_shared_expert_intermediate_size", "n_group", "topk_group",
                 "max_position_embeddings"):
        value = getattr(c, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and 0 < value <= INT32_MAX, name,
                 f"must be a positive integer up to {INT32_MAX}, got {value!r}")
    for name in ("bos_token_id", "pad_token_id"):
        value = getattr(c, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name,
                 f"must be a token id (an integer >= 0), got {value!r}")
    _require(len(c.eos_token_id) > 0 and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                             for i in c.eos_token_id), "eos_token_id",
             f"must be token ids (integers >= 0), got {c.eos_token_id!r}")
    for name in ("routed_scaling_factor", "layer_norm_epsilon"):
        value = getattr(c, name)
        _require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name,
                 f"must be a finite number > 0, got {value!r}")
    _require(len(c.layer_types) > 0, "layer_types", "the model needs at least one layer")
    for field, kinds in (("layer_types", c.layer_types), ("mtp_layer_types", c.mtp_layer_types)):
        bad = [k for k in kinds if k not in LAYER_KINDS]
        _require(not bad, field, f"unknown layer kinds {bad}; expected one of {LAYER_KINDS}")
    _require(c.num_attention_heads % c.num_key_value_heads == 0, "num_key_value_heads",
             f"{c.num_key_value_heads} does not divide num_attention_heads={c.num_attention_heads}")
    _require(c.mamba_num_heads % c.n_groups == 0, "n_groups",
             f"{c.n_groups} does not divide mamba_num_heads={c.mamba_num_heads}")
    _require(c.n_routed_experts % c.n_group == 0, "n_group",
             f"n_routed_experts={c.n_routed_experts} is not divisible by n_group={c.n_group}")
    _require(c.topk_group <= c.n_group, "topk_group", f"{c.topk_group} exceeds n_group={c.n_group}")
    per_group = c.n_routed_experts // c.n_group
    _require(c.n_group == 1 or per_group >= 2, "n_group",
             "group-limited routing scores each group by its top-2 experts; groups need >= 2 experts")
    _require(c.num_experts_per_tok <= per_group * c.topk_group, "num_experts_per_tok",
             f"{c.num_experts_per_tok} exceeds the experts reachable in topk_group={c.topk_group} groups")
    _require(c.moe_latent_size is None or (isinstance(c.moe_latent_size, int) and 0 < c.moe_latent_size <= INT32_MAX),
             "moe_latent_size", f"must be a positive integer or null, got {c.moe_latent_size!r}")
    lo, hi = c.time_step_limit
    _require(0.0 <= lo <= hi, "time_step_limit", f"expected 0 <= low <= high, got {c.time_step_limit}")
    _require(c.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers",
             f"0 or 1 supported (the published models share one MTP block), got {c.num_nextn_predict_layers}")
    _require(c.num_nextn_predict_layers == 0 or len(c.mtp_layer_types) > 0, "mtp_layer_types",
             "num_nextn_predict_layers > 0 needs an MTP pattern")
    _require(isinstance(c.mtp_num_depths, int) and not isinstance(c.mtp_num_depths, bool)
             and 1 <= c.mtp_num_depths <= MAX_MTP_DEPTHS, "mtp_num_depths",
             f"must be an integer in [1, {MAX_MTP_DEPTHS}], got {c.mtp_num_depths!r}")
    for name in ("param_dtype", "compute_dtype"):
        value = getattr(c, name)
        _require(value in FLOAT_DTYPES, name, f"expected one of {FLOAT_DTYPES}, got {value!r}")
    _require(c.remat in REMAT_POLICIES, "remat", f"expected one of {REMAT_POLICIES}, got {c.remat!r}")
    _require(c.kernels in KERNEL_CHOICES, "kernels", f"expected one of {KERNEL_CHOICES}, got {c.kernels!r}")
    _require(isinstance(c.scan_layers, bool), "scan_layers", f"expected true, false or null, got {c.scan_layers!r}")
    _require(c.moe_capacity_factor is None or (isinstance(c.moe_capacity_factor, int | float)
                                               and c.moe_capacity_factor > 0),
             "moe_capacity_factor", f"expected a positive number or null, got {c.moe_capacity_factor!r}")
    bad_formats = sorted({f for _, f in c.weight_formats} - set(WEIGHT_FORMATS))
    _require(not bad_formats, "weight_formats", f"unknown formats {bad_formats}; expected {WEIGHT_FORMATS}")
    _require(c.kv_cache_quant in KV_CACHE_QUANT, "kv_cache_quant",
             f"expected one of {KV_CACHE_QUANT}, got {c.kv_cache_quant!r}")
    _require(c.kv_cache_dtype is None or c.kv_cache_dtype in KV_CACHE_DTYPES.values(), "kv_cache_dtype",
             f"expected one of {sorted(KV_CACHE_DTYPES.values())} or null, got {c.kv_cache_dtype!r}")
    _require(c.train_quant in TRAIN_QUANT, "train_quant", f"expected one of {TRAIN_QUANT}, got {c.train_quant!r}")
    mixed = nonuniform_formats(c.layer_types, c.weight_formats) if c.scan_layers else []
    _require(not mixed, "weight_formats", "scanned layers (scan_layers=true) need one format per weight across "
             f"the layers of a kind; use scan_layers=false for {mixed}")
