"""Model configuration: a frozen dataclass parsed from any published Nemotron-H `config.json`.

Every published naming is accepted (`hybrid_override_pattern`, `layers_block_type` with the
old `mamba/attention` or new `linear_attention/full_attention` names, `num_hidden_layers: null`,
the MTP pattern fields, `time_step_limit` / `mamba_dt_limit`). Validation names the bad field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from nemojax.errors import ConfigError

LAYER_KINDS = ("mamba", "attention", "moe", "mlp")
PATTERN_LETTERS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
_BLOCK_TYPE_NAMES = {
    "mamba": "mamba",
    "linear_attention": "mamba",
    "attention": "attention",
    "full_attention": "attention",
    "moe": "moe",
    "mlp": "mlp",
}
_DTYPES = ("float32", "bfloat16", "float16")
_REMAT = ("none", "full", "dots")
# Fields that are nemojax choices, not part of a published config.json.
NEMOJAX_FIELDS = ("param_dtype", "dtype", "remat")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of one Nemotron-H model (main stack plus MTP block)."""

    vocab_size: int
    hidden_size: int
    layer_types: tuple[str, ...]
    # Attention (GQA, no positional encoding).
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    # Mamba-2.
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # Dense MLP.
    intermediate_size: int = 1856
    # LatentMoE.
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    moe_latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Multi-token prediction.
    mtp_layer_types: tuple[str, ...] = ()
    num_nextn_predict_layers: int = 0
    # Misc.
    layer_norm_epsilon: float = 1e-5
    max_position_embeddings: int = 262144
    bos_token_id: int = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int = 0
    # Numerics and implementation choices (not part of the published config).
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    remat: str = "none"

    def __post_init__(self) -> None:
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
        letters = {kind: letter for letter, kind in PATTERN_LETTERS.items()}
        return "".join(letters[k] for k in self.layer_types)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layer_types"] = list(self.layer_types)
        out["mtp_layer_types"] = list(self.mtp_layer_types)
        out["eos_token_id"] = list(self.eos_token_id)
        out["time_step_limit"] = list(self.time_step_limit)
        return out

    def to_hf_dict(self) -> dict[str, Any]:
        """The published `config.json` fields (for writing Hugging Face checkpoints)."""
        hf = {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "hybrid_override_pattern": self.pattern,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "mamba_num_heads": self.mamba_num_heads,
            "mamba_head_dim": self.mamba_head_dim,
            "ssm_state_size": self.ssm_state_size,
            "n_groups": self.n_groups,
            "conv_kernel": self.conv_kernel,
            "chunk_size": self.chunk_size,
            "use_conv_bias": self.use_conv_bias,
            "time_step_limit": [self.time_step_limit[0], self.time_step_limit[1]],
            # transformers clamps dt at time_step_min (not time_step_limit[0]); keep the two equal.
            "time_step_min": self.time_step_limit[0],
            "intermediate_size": self.intermediate_size,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "moe_shared_expert_intermediate_size": self.moe_shared_expert_intermediate_size,
            "moe_latent_size": self.moe_latent_size,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "norm_topk_prob": self.norm_topk_prob,
            "routed_scaling_factor": self.routed_scaling_factor,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) > 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": False,
            "use_bias": False,
            "mlp_bias": False,
            "attention_bias": False,
            "mlp_hidden_act": "relu2",
            "mamba_hidden_act": "silu",
            "n_shared_experts": 1,
        }
        if self.has_mtp:
            letters = {kind: letter for letter, kind in PATTERN_LETTERS.items()}
            hf["mtp_hybrid_override_pattern"] = "".join(letters[k] for k in self.mtp_layer_types)
            hf["num_nextn_predict_layers"] = self.num_nextn_predict_layers
        return hf


def _require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config field `{field}`: {message}")


def _validate(c: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                 "chunk_size", "intermediate_size", "n_routed_experts", "num_experts_per_tok",
                 "moe_intermediate_size", "moe_shared_expert_intermediate_size", "n_group", "topk_group"):
        value = getattr(c, name)
        _require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
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
    _require(c.moe_latent_size is None or (isinstance(c.moe_latent_size, int) and c.moe_latent_size > 0),
             "moe_latent_size", f"must be a positive integer or null, got {c.moe_latent_size!r}")
    lo, hi = c.time_step_limit
    _require(0.0 <= lo <= hi, "time_step_limit", f"expected 0 <= low <= high, got {c.time_step_limit}")
    _require(c.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers",
             f"0 or 1 supported (the published models share one MTP block), got {c.num_nextn_predict_layers}")
    _require(c.num_nextn_predict_layers == 0 or len(c.mtp_layer_types) > 0, "mtp_layer_types",
             "num_nextn_predict_layers > 0 needs an MTP pattern")
    _require(c.param_dtype in _DTYPES, "param_dtype", f"expected one of {_DTYPES}, got {c.param_dtype!r}")
    _require(c.dtype in _DTYPES, "dtype", f"expected one of {_DTYPES}, got {c.dtype!r}")
    _require(c.remat in _REMAT, "remat", f"expected one of {_REMAT}, got {c.remat!r}")


def parse_pattern(pattern: str, field: str = "hybrid_override_pattern") -> tuple[str, ...]:
    """Turn `"MEM*E-"` into layer kinds; an unknown letter names its position."""
    kinds = []
    for i, letter in enumerate(pattern):
        if letter not in PATTERN_LETTERS:
            raise ConfigError(f"config field `{field}`: unknown layer letter {letter!r} at position {i} "
                              f"(expected one of {sorted(PATTERN_LETTERS)})")
        kinds.append(PATTERN_LETTERS[letter])
    return tuple(kinds)


def parse_block_types(names: Sequence[str], field: str = "layers_block_type") -> tuple[str, ...]:
    """Turn published block-type names (old or new spelling) into layer kinds."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ConfigError(f"config field `{field}`: expected a list of layer names, got {type(names).__name__}")
    kinds = []
    for i, name in enumerate(names):
        if name not in _BLOCK_TYPE_NAMES:
            raise ConfigError(f"config field `{field}`: unknown layer type {name!r} at index {i} "
                              f"(expected one of {sorted(_BLOCK_TYPE_NAMES)})")
        kinds.append(_BLOCK_TYPE_NAMES[name])
    return tuple(kinds)


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
    if n is not None and n != len(kinds):
        raise ConfigError(f"config field `num_hidden_layers`: {n} disagrees with the {len(kinds)} layers "
                          "of the layer pattern")
    return kinds


def _mtp_kinds(hf: Mapping[str, Any]) -> tuple[str, ...]:
    if int(hf.get("num_nextn_predict_layers") or 0) == 0:
        return ()
    if hf.get("mtp_hybrid_override_pattern"):
        return parse_pattern(hf["mtp_hybrid_override_pattern"], "mtp_hybrid_override_pattern")
    if hf.get("mtp_layers_block_type"):
        return parse_block_types(hf["mtp_layers_block_type"], "mtp_layers_block_type")
    return ("attention", "moe")  # the transformers default


def _time_step_limit(hf: Mapping[str, Any]) -> tuple[float, float]:
    raw = hf.get("time_step_limit", hf.get("mamba_dt_limit"))
    if raw is None:
        return (0.0, math.inf)
    if not isinstance(raw, Sequence) or len(raw) != 2:
        raise ConfigError(f"config field `time_step_limit`: expected [low, high], got {raw!r}")
    # transformers writes infinities as {"__float__": "Infinity"}.
    low, high = (float(v["__float__"]) if isinstance(v, Mapping) else float(v) for v in raw)
    return (low, high)


def _unsupported(hf: Mapping[str, Any]) -> None:
    for flag in ("use_bias", "mlp_bias", "attention_bias", "mamba_proj_bias", "tie_word_embeddings"):
        if hf.get(flag):
            raise ConfigError(f"config field `{flag}`: true is not supported (no published model uses it)")
    for field, expected in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        if hf.get(field, expected) != expected:
            raise ConfigError(f"config field `{field}`: only {expected!r} is supported, got {hf[field]!r}")
    if int(hf.get("n_shared_experts", 1)) != 1:
        raise ConfigError(f"config field `n_shared_experts`: only 1 is supported, got {hf['n_shared_experts']}")


def from_hf_config(source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Parse a published `config.json` (a path, a directory holding one, or a dict).

    `overrides` set nemojax-only fields such as `dtype`, `param_dtype` and `remat`.
    """
    if isinstance(source, Mapping):
        hf = dict(source)
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                hf = json.load(f)
        except FileNotFoundError as e:
            raise ConfigError(f"no config file at {path}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
    _unsupported(hf)
    eos = hf.get("eos_token_id", 2)
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    fields = dict(
        vocab_size=hf.get("vocab_size"),
        hidden_size=hf.get("hidden_size"),
        layer_types=_layer_kinds(hf),
        num_attention_heads=hf.get("num_attention_heads", 32),
        num_key_value_heads=hf.get("num_key_value_heads") or hf.get("num_attention_heads", 32),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf.get("num_attention_heads", 32),
        mamba_num_heads=hf.get("mamba_num_heads", 128),
        mamba_head_dim=hf.get("mamba_head_dim", 64),
        ssm_state_size=hf.get("ssm_state_size", 128),
        n_groups=hf.get("n_groups", hf.get("mamba_n_groups", 8)),
        conv_kernel=hf.get("conv_kernel", hf.get("mamba_d_conv", 4)),
        chunk_size=hf.get("chunk_size", hf.get("mamba_chunk_size", 128)),
        use_conv_bias=bool(hf.get("use_conv_bias", hf.get("mamba_conv_bias", True))),
        time_step_limit=_time_step_limit(hf),
        intermediate_size=hf.get("intermediate_size", 21504),
        n_routed_experts=hf.get("n_routed_experts", 8),
        num_experts_per_tok=hf.get("num_experts_per_tok", 2),
        moe_intermediate_size=hf.get("moe_intermediate_size", 7688),
        moe_shared_expert_intermediate_size=hf.get("moe_shared_expert_intermediate_size", 7688),
        moe_latent_size=hf.get("moe_latent_size"),
        n_group=hf.get("n_group", 1),
        topk_group=hf.get("topk_group", 1),
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        mtp_layer_types=_mtp_kinds(hf),
        num_nextn_predict_layers=int(hf.get("num_nextn_predict_layers") or 0),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", hf.get("norm_eps", 1e-5))),
        max_position_embeddings=int(hf.get("max_position_embeddings", 262144)),
        bos_token_id=int(hf.get("bos_token_id", 1) or 1),
        eos_token_id=eos,
        pad_token_id=int(hf.get("pad_token_id", 0) or 0),
    )
    for name in ("vocab_size", "hidden_size"):
        if fields[name] is None:
            raise ConfigError(f"config field `{name}` is missing")
    fields.update({k: hf[k] for k in NEMOJAX_FIELDS if k in hf})
    fields.update(overrides)
    return ModelConfig(**fields)


def from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Inverse of `ModelConfig.to_dict` (used by checkpoints written by nemojax)."""
    d = dict(d)
    d["layer_types"] = tuple(d["layer_types"])
    d["mtp_layer_types"] = tuple(d.get("mtp_layer_types", ()))
    d["eos_token_id"] = tuple(d.get("eos_token_id", (2,)))
    d["time_step_limit"] = tuple(float(x) for x in d.get("time_step_limit", (0.0, math.inf)))
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown config fields {unknown}")
    return ModelConfig(**d)


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config_file(path: str | os.PathLike) -> Any:
    """Run an ml-collections config file (`configs/*.py`) and return its `get_config()`."""
    import importlib.util

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"no config file at {path}")
    spec = importlib.util.spec_from_file_location(f"nemojax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config()")
    return module.get_config()


def resolve_model_config(spec: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a configs/ name ("tiny", "nano", ...), a configs/*.py file, a config.json
    file, or a directory holding one."""
    spec = os.fspath(spec)
    named = os.path.join(CONFIGS_DIR, f"{spec}.py")
    if os.sep not in spec and os.path.isfile(named):
        spec = named
    if spec.endswith(".py"):
        return from_hf_config(load_config_file(spec).model.to_dict(), **overrides)
    if os.path.isdir(spec) or spec.endswith(".json"):
        return from_hf_config(spec, **overrides)
    names = sorted(f[:-3] for f in os.listdir(CONFIGS_DIR) if f.endswith(".py")) if os.path.isdir(CONFIGS_DIR) else []
    raise ConfigError(f"unknown model config {spec!r}: expected one of {names}, a configs/*.py file, "
                      "a config.json, or a checkpoint directory")
