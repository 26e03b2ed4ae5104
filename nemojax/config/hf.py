"""The published `config.json` <-> ModelConfig: every naming Nemotron-H checkpoints use.

Accepted: `hybrid_override_pattern`, `layers_block_type` with the old `mamba/attention` or new
`linear_attention/full_attention` names, `num_hidden_layers: null`, the MTP pattern fields,
`time_step_limit` / `mamba_dt_limit` and the other `mamba_*` aliases. A field left out takes the
ModelConfig default (the transformers default). Validation names the bad field. Published configs carry
fields the model does not use (`rope_theta`, `use_cache`, ...): those are known and pass silently; any
other field is ignored with a `NemojaxWarning` naming it, never dropped without a word.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from nemojax.config.model_config import (
    FLOAT_DTYPES,
    NEMOJAX_FIELDS,
    PATTERN_LETTERS,
    ModelConfig,
    kinds_to_pattern,
)
from nemojax.errors import ConfigError, NemojaxWarning

_BLOCK_TYPE_NAMES = {
    "mamba": "mamba",
    "linear_attention": "mamba",
    "attention": "attention",
    "full_attention": "attention",
    "moe": "moe",
    "mlp": "mlp",
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
# ModelConfig field -> the older config.json names it may appear under, in order of preference.
_ALIASES = {
    "n_groups": ("mamba_n_groups",),
    "conv_kernel": ("mamba_d_conv",),
    "chunk_size": ("mamba_chunk_size",),
    "use_conv_bias": ("mamba_conv_bias",),
    "layer_norm_epsilon": ("norm_eps",),
}
_PASSED_THROUGH = ("vocab_size", "hidden_size", "num_attention_heads", "mamba_num_heads", "mamba_head_dim",
                   "ssm_state_size", "n_groups", "conv_kernel", "chunk_size", "intermediate_size",
                   "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                   "moe_shared_expert_intermediate_size", "moe_latent_size", "n_group", "topk_group",
                   "max_position_embeddings")
# Fields this module reads, and fields of published configs (transformers' NemotronHConfig and its base
# class) that do not change the model here.
READ_FIELDS = frozenset((*_PASSED_THROUGH, *(a for names in _ALIASES.values() for a in names), *NEMOJAX_FIELDS,
                         "hybrid_override_pattern", "layers_block_type", "layer_types", "num_hidden_layers",
                         "mtp_hybrid_override_pattern", "mtp_layers_block_type", "num_nextn_predict_layers",
                         "num_key_value_heads", "head_dim", "use_conv_bias", "time_step_limit", "mamba_dt_limit",
                         "norm_topk_prob", "routed_scaling_factor", "layer_norm_epsilon", "bos_token_id",
                         "eos_token_id", "pad_token_id", "use_bias", "mlp_bias", "attention_bias", "mamba_proj_bias",
                         "tie_word_embeddings", "mlp_hidden_act", "mamba_hidden_act", "n_shared_experts",
                         "torch_dtype", "dtype"))
UNUSED_FIELDS = frozenset((
    "architectures", "model_type", "transformers_version", "_name_or_path", "auto_map", "quantization_config",
    "use_cache", "num_logits_to_keep", "attention_dropout", "hidden_dropout", "sliding_window", "use_mamba_kernels",
    "expand", "time_step_min", "time_step_max", "time_step_floor", "mamba_ssm_cache_dtype", "output_router_logits",
    "moe_shared_expert_overlap", "initializer_range", "residual_in_fp32", "rescale_prenorm_residual", "rope_theta",
    "partial_rotary_factor", "rope_scaling", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class",
    "torchscript", "pruned_heads", "tie_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "task_specific_params", "finetuning_task", "prefix", "sep_token_id",
    "decoder_start_token_id"))
KNOWN_FIELDS = READ_FIELDS | UNUSED_FIELDS


def unknown_field_message(names: Sequence[str]) -> str:
    """`'hiden_size' (did you mean 'hidden_size'?)`, for each name."""
    hints = []
    for name in names:
        close = difflib.get_close_matches(name, sorted(READ_FIELDS), n=1, cutoff=0.8)
        hints.append(repr(name) + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(hints)


def parse_pattern(pattern: str, field: str = "hybrid_override_pattern") -> tuple[str, ...]:
    """Turn `"MEM*E-"` into layer kinds; an unknown letter names its position."""
    if not isinstance(pattern, str):
        raise ConfigError(f"config field `{field}`: expected a string such as \"M*E\", got {pattern!r}")
    return _layer_kinds_from(pattern, PATTERN_LETTERS, field, "layer letter", "position")


def parse_block_types(names: Sequence[str], field: str = "layers_block_type") -> tuple[str, ...]:
    """Turn published block-type names (old or new spelling) into layer kinds."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ConfigError(f"config field `{field}`: expected a list of layer names, got {type(names).__name__}")
    return _layer_kinds_from(names, _BLOCK_TYPE_NAMES, field, "layer type", "index")


def _layer_kinds_from(items: Sequence[str], table: Mapping[str, str], field: str, what: str,
                      place: str) -> tuple[str, ...]:
    """Each item looked up in `table`; the first unknown one is a ConfigError naming the field and its place."""
    for i, item in enumerate(items):
        if not isinstance(item, str) or item not in table:
            raise ConfigError(f"config field `{field}`: unknown {what} {item!r} at {place} {i} "
                              f"(expected one of {sorted(table)})")
    return tuple(table[item] for item in items)


def _layer_kinds(hf: Mapping[str, Any]) -> tuple[str, ...]:
    if hf.get("hybrid_override_pattern"):
        kinds = parse_pattern(hf["hybrid_override_pattern"])
    elif hf.get("layers_block_type"):
        kinds = parse_block_types(hf["layers_block_type"])
    elif hf.get("layer_types"):
        kinds = parse_block_types(hf["layer_types"], "layer_types")
    else:
        raise ConfigError("config has neither `hybrid_override_pattern` nor `layers_block_type`")
    n = hf.get("num_hidden_layers")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n != len(kinds)):
        raise ConfigError(f"config field `num_hidden_layers`: {n} disagrees with the {len(kinds)} layers "
                          "of the layer pattern")
    return kinds


def _mtp_kinds(hf: Mapping[str, Any]) -> tuple[str, ...]:
    if _mtp_layers(hf) == 0:
        return ()
    if hf.get("mtp_hybrid_override_pattern"):
        return parse_pattern(hf["mtp_hybrid_override_pattern"], "mtp_hybrid_override_pattern")
    if hf.get("mtp_layers_block_type"):
        return parse_block_types(hf["mtp_layers_block_type"], "mtp_layers_block_type")
    return ("attention", "moe")  # the transformers default


def _time_step_limit(hf: Mapping[str, Any]) -> tuple[float, float]:
    raw = hf.get("time_step_limit", hf.get("mamba_dt_limit"))
    if raw is None:
        return _DEFAULTS["time_step_limit"]
    if not isinstance(raw, Sequence) or len(raw) != 2:
        raise ConfigError(f"config field `time_step_limit`: expected [low, high], got {raw!r}")
    try:  # transformers writes infinities as {"__float__": "Infinity"}
        low, high = (float(v["__float__"]) if isinstance(v, Mapping) else float(v) for v in raw)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"config field `time_step_limit`: expected two numbers, got {raw!r}") from e
    return (low, high)


def _unsupported(hf: Mapping[str, Any]) -> None:
    for flag in ("use_bias", "mlp_bias", "attention_bias", "mamba_proj_bias", "tie_word_embeddings"):
        if hf.get(flag):
            raise ConfigError(f"config field `{flag}`: true is not supported (no published model uses it)")
    for field, expected in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        if hf.get(field, expected) != expected:
            raise ConfigError(f"config field `{field}`: only {expected!r} is supported, got {hf[field]!r}")
    if hf.get("n_shared_experts", 1) != 1:
        raise ConfigError(f"config field `n_shared_experts`: only 1 is supported, got {hf['n_shared_experts']!r}")


def _field(hf: Mapping[str, Any], name: str) -> Any:
    for key in (name, *_ALIASES.get(name, ())):
        if key in hf:
            return hf[key]
    return _DEFAULTS.get(name)


def _number(hf: Mapping[str, Any], name: str, kind: type) -> Any:
    value = _field(hf, name)
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config field `{name}`: expected a {kind.__name__}, got {value!r}") from e


def _token_id(hf: Mapping[str, Any], name: str) -> int:
    value = hf.get(name)
    return _DEFAULTS[name] if value is None else _integer(value, name)


def _integer(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"config field `{name}`: expected an integer, got {value!r}")
    return value


def _mtp_layers(hf: Mapping[str, Any]) -> int:
    value = hf.get("num_nextn_predict_layers")
    return 0 if value is None else _integer(value, "num_nextn_predict_layers")


def _eos_ids(hf: Mapping[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id", _DEFAULTS["eos_token_id"])
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    if not eos:
        raise ConfigError("config field `eos_token_id`: expected an integer or a non-empty list of integers")
    return tuple(_integer(i, "eos_token_id") for i in eos)


def read_hf_config(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The raw `config.json` dict of a path, a directory holding one, or a dict (copied)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"no config file at {path}") from e
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path} is not a readable JSON config: {e}") from e
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return hf


def storage_dtype(hf: Mapping[str, Any]) -> str:
    """The dtype the checkpoint's floating tensors are stored in (`torch_dtype` / `dtype`), float32 if unknown."""
    name = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
    return name if name in FLOAT_DTYPES else "float32"


def from_hf_config(source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Parse a published `config.json` (a path, a directory holding one, or a dict).

    `overrides` set nemojax-only fields such as `compute_dtype`, `param_dtype` and `remat` (a dict may
    carry them too, as the configs/*.py files do); a `dtype` key is the storage dtype and is not read.
    """
    hf = read_hf_config(source)
    _warn_unknown(hf, source)
    _unsupported(hf)
    for name in ("vocab_size", "hidden_size"):
        if hf.get(name) is None:
            raise ConfigError(f"config field `{name}` is missing")
    fields: dict[str, Any] = {name: _field(hf, name) for name in _PASSED_THROUGH}
    heads = fields["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads", _DEFAULTS["num_key_value_heads"])
    head_dim = hf.get("head_dim")
    fields.update(
        layer_types=_layer_kinds(hf),
        num_key_value_heads=heads if kv_heads is None else kv_heads,  # transformers: None means MHA
        head_dim=_DEFAULTS["head_dim"] if head_dim is None else head_dim,
        use_conv_bias=bool(_field(hf, "use_conv_bias")),
        time_step_limit=_time_step_limit(hf),
        norm_topk_prob=bool(_field(hf, "norm_topk_prob")),
        routed_scaling_factor=_number(hf, "routed_scaling_factor", float),
        mtp_layer_types=_mtp_kinds(hf),
        num_nextn_predict_layers=_mtp_layers(hf),
        layer_norm_epsilon=_number(hf, "layer_norm_epsilon", float),
        bos_token_id=_token_id(hf, "bos_token_id"),
        eos_token_id=_eos_ids(hf),
        pad_token_id=_token_id(hf, "pad_token_id"),
    )
    fields.update({k: hf[k] for k in NEMOJAX_FIELDS if k in hf})
    fields.update(overrides)
    return ModelConfig(**fields)


def _warn_unknown(hf: Mapping[str, Any], source: Any) -> None:
    unknown = sorted(k for k in hf if k not in KNOWN_FIELDS)
    if unknown:
        where = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "model config"
        where = os.path.join(where, "config.json") if os.path.isdir(where) else where
        warnings.warn(f"{where}: ignoring unknown config field {unknown_field_message(unknown)}", NemojaxWarning,
                      stacklevel=3)


def to_hf_dict(config: ModelConfig) -> dict[str, Any]:
    """The published `config.json` fields of a config (for writing Hugging Face checkpoints)."""
    c = config
    hf = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "hybrid_override_pattern": c.pattern,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "mamba_num_heads": c.mamba_num_heads,
        "mamba_head_dim": c.mamba_head_dim,
        "ssm_state_size": c.ssm_state_size,
        "n_groups": c.n_groups,
        "conv_kernel": c.conv_kernel,
        "chunk_size": c.chunk_size,
        "use_conv_bias": c.use_conv_bias,
        "time_step_limit": [c.time_step_limit[0], c.time_step_limit[1]],
        # transformers clamps dt at time_step_min (not time_step_limit[0]); keep the two equal.
        "time_step_min": c.time_step_limit[0],
        "intermediate_size": c.intermediate_size,
        "n_routed_experts": c.n_routed_experts,
        "num_experts_per_tok": c.num_experts_per_tok,
        "moe_intermediate_size": c.moe_intermediate_size,
        "moe_shared_expert_intermediate_size": c.moe_shared_expert_intermediate_size,
        "moe_latent_size": c.moe_latent_size,
        "n_group": c.n_group,
        "topk_group": c.topk_group,
        "norm_topk_prob": c.norm_topk_prob,
        "routed_scaling_factor": c.routed_scaling_factor,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "max_position_embeddings": c.max_position_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id) if len(c.eos_token_id) > 1 else c.eos_token_id[0],
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": False,
        "use_bias": False,
        "mlp_bias": False,
        "attention_bias": False,
        "mlp_hidden_act": "relu2",
        "mamba_hidden_act": "silu",
        "n_shared_experts": 1,
    }
    if c.has_mtp:
        hf["mtp_hybrid_override_pattern"] = kinds_to_pattern(c.mtp_layer_types)
        hf["num_nextn_predict_layers"] = c.num_nextn_predict_layers
    return hf
