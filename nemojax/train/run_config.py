"""The training run configuration: defaults for every field, a configs/*.py file on top, then
`--config.a.b=value` overrides from the command line.

A config file only needs `model` (the published config fields); any training field it sets
replaces the default. Overrides are typed by the field they replace, so a typo or a wrong type
is a ConfigError naming the field; under `model` a field must be one a config.json may hold.
`check_run_config` bounds every training field (integers within int32, finite rates) before any work.
"""

from __future__ import annotations

import ast
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from nemojax.config import INT32_MAX, ModelConfig, from_hf_config, load_config_file
from nemojax.config.hf import READ_FIELDS, UNUSED_FIELDS, unknown_field_message
from nemojax.errors import ConfigError
from nemojax.train.data import default_data_config
from nemojax.train.optimizer import SCHEDULES, default_optimizer_config

OVERRIDE_PREFIX = "--config."


def default_run_config() -> ml_collections.ConfigDict:
    """Every training field with its default (the model comes from the config file)."""
    return ml_collections.ConfigDict(dict(
        seed=0,
        num_steps=1000,
        batch_size=8,            # global batch (sequences per optimizer step)
        seq_len=128,
        grad_accum_steps=1,      # micro-batches per step; batch_size must divide
        log_every=10,
        eval_every=200,
        eval_batches=8,          # held-out batches per evaluation (a fixed set)
        checkpoint_every=200,
        keep_checkpoints=3,
        mtp_loss_weight=0.3,
        aux_loss_weight=0.0,     # optional sequence-level MoE balance loss
        loss_chunk_tokens=1024,  # tokens of the batch whose [tokens, vocab] logits exist at once
        bias_update_rate=1e-3,   # auxiliary-loss-free balancing: correction-bias step per update
        max_bad_steps=10,        # non-finite steps in a row before the run stops
        remat="none",            # "none" | "full" | "dots"
        param_dtype="float32",   # master weights
        compute_dtype="",        # "" keeps the model config's dtype
        quant=default_quant_config(),
        optimizer=default_optimizer_config(),
        data=default_data_config(),
        mesh=dict(data=1, fsdp=-1, tensor=1, expert=1),  # -1: every device (of every process)
        model=ml_collections.ConfigDict(),
    ))


def default_quant_config() -> ml_collections.ConfigDict:
    """The `quant` block: `training="nvfp4"` trains linears with the NVFP4 recipe (`nemojax.quant.training`),
    except the weights matching `keep` (fnmatch on weight keys such as "backbone/layers_2/mixer/q_proj")
    and the last `keep_last_fraction` of the layers, which stay in the compute dtype (the recipe's
    defaults: attention and latent projections, the Mamba out_proj, lm_head, the MTP block, the final 15%)."""
    return ml_collections.ConfigDict(dict(
        training="none",
        keep=("lm_head", "mtp/*", "*/mixer/q_proj", "*/mixer/k_proj", "*/mixer/v_proj", "*/mixer/o_proj",
              "*/fc1_latent_proj", "*/fc2_latent_proj", "*/mixer/out_proj"),
        keep_last_fraction=0.15,
    ))


def training_numerics(cfg: ml_collections.ConfigDict, config: ModelConfig) -> dict[str, Any]:
    """The ModelConfig fields the run decides: remat and the NVFP4 training recipe (`cfg.quant`), which keeps
    the last layers out with the unrolled layer layout."""
    quant = cfg.quant
    if quant.training not in ("none", "nvfp4"):
        raise ConfigError(f"config field `quant.training`: expected 'none' or 'nvfp4', got {quant.training!r}")
    if not 0 <= float(quant.keep_last_fraction) <= 1:
        raise ConfigError(f"config field `quant.keep_last_fraction`: expected a fraction in [0, 1], "
                          f"got {quant.keep_last_fraction}")
    last = round(float(quant.keep_last_fraction) * config.num_layers)
    keep = tuple(quant.keep) + tuple(f"backbone/layers_{i}/*" for i in range(config.num_layers - last,
                                                                             config.num_layers))
    fields = {"remat": cfg.remat, "train_quant": quant.training, "train_quant_keep": keep}
    if quant.training == "nvfp4" and last and cfg.model.get("scan_layers") is None:
        # Scanned layers share one module per layer kind: keeping only the last layers in the compute dtype
        # needs the unrolled stack (the default layout is chosen here; an explicit scan_layers=true is refused).
        fields["scan_layers"] = False
    return fields


def _merge(base: ml_collections.ConfigDict, update: ml_collections.ConfigDict, where: str = "") -> None:
    """Copy `update` into `base`; nested blocks merge field by field, except `model`, which is replaced.
    A value of the wrong type for its field is a ConfigError naming the field."""
    for key, value in update.items():
        name = f"{where}{key}"
        if name == "model" and not isinstance(value, (ml_collections.ConfigDict, dict)):
            raise ConfigError(f"config field `model`: expected a block of config.json fields, got {value!r}")
        try:
            if name == "model" or key not in base:
                base[key] = value
            elif isinstance(base[key], ml_collections.ConfigDict) and isinstance(value, ml_collections.ConfigDict):
                _merge(base[key], value, name + ".")
            else:
                base[key] = value
        except TypeError as e:  # ml_collections keeps each field's type
            raise ConfigError(f"config field `{name}`: {e}") from e


def _parse_value(text: str, current: Any, name: str) -> Any:
    """`text` as the type of the field it replaces."""
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(current, int):
            number = float(text)
            if not number.is_integer():
                raise ValueError(text)
            return int(number)
        if isinstance(current, float):
            number = float(text)
            if not math.isfinite(number):
                raise ValueError(text)
            return number
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)):
            if text.startswith(("[", "(")):
                return tuple(ast.literal_eval(text))
            return tuple(p for p in text.split(",") if p)
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        if current is None:
            return text
        kind = "a finite float" if isinstance(current, float) else type(current).__name__
        raise ConfigError(f"--config.{name}: cannot read {text!r} as {kind}") from e


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply `--config.a.b=value` (or `--config.a.b value`) arguments in order."""
    items = list(overrides)
    while items:
        arg = items.pop(0)
        if not arg.startswith(OVERRIDE_PREFIX):
            raise ConfigError(f"unrecognised argument {arg!r} (config overrides look like --config.field=value)")
        name, sep, text = arg[len(OVERRIDE_PREFIX):].partition("=")
        if not sep:
            if not items:
                raise ConfigError(f"{arg} needs a value")
            text = items.pop(0)
        *parents, key = name.split(".")
        node = cfg
        for i, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"--config.{name}: no config block {'.'.join(parents[:i + 1])!r}")
            node = node[part]
        in_model = parents == ["model"]
        if in_model and key in UNUSED_FIELDS:
            raise ConfigError(f"--config.{name}: a published config field that does not change the model here")
        if key not in node and not (in_model and key in READ_FIELDS):
            known = "any config.json field of the model" if in_model else f"known here: {sorted(node.keys())}"
            hint = unknown_field_message([key]) if in_model else repr(key)
            raise ConfigError(f"--config.{name}: unknown field {hint} ({known})")
        node[key] = _parse_value(text, node.get(key), name)


def load_run_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Defaults, then the config file's get_config(), then the overrides."""
    cfg = default_run_config()
    loaded = load_config_file(path)
    if not isinstance(loaded, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() must return an ml_collections.ConfigDict, got "
                          f"{type(loaded).__name__}")
    _merge(cfg, loaded)
    apply_overrides(cfg, overrides)
    if not cfg.model:
        raise ConfigError(f"{path}: get_config() has no `model` block")
    return cfg


# Training fields: (lowest value, highest value); integers stop at int32, rates must be finite.
_INT_FIELDS = {"seed": 0, "num_steps": 0, "batch_size": 1, "seq_len": 1, "grad_accum_steps": 1, "log_every": 1,
               "eval_every": 1, "eval_batches": 0, "checkpoint_every": 1, "keep_checkpoints": 1, "max_bad_steps": 0,
               "loss_chunk_tokens": 1}
_FLOAT_FIELDS = {"mtp_loss_weight": (0, math.inf), "aux_loss_weight": (0, math.inf),
                 "bias_update_rate": (0, math.inf)}
_OPTIMIZER_FIELDS = {"learning_rate": (0, math.inf), "decay_fraction": (0, 1), "min_lr_ratio": (0, 1),
                     "b1": (0, 1), "b2": (0, 1), "eps": (0, math.inf), "weight_decay": (0, math.inf),
                     "grad_clip_norm": (0, math.inf)}


def check_run_config(cfg: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first training field out of range (model and data fields are checked by
    ModelConfig and `validate_data_config`)."""
    def number(value: Any, name: str, low: float, high: float, integer: bool) -> None:
        kind = int if integer else (int, float)
        ok = isinstance(value, kind) and not isinstance(value, bool)
        ok = ok and (integer or math.isfinite(value)) and low <= value <= high
        if not ok:
            what = "an integer" if integer else "a finite number"
            raise ConfigError(f"config field `{name}`: must be {what} in [{low}, {high}], got {value!r}")

    for name, low in _INT_FIELDS.items():
        number(cfg[name], name, low, INT32_MAX, True)
    for name, (low, high) in _FLOAT_FIELDS.items():
        number(cfg[name], name, low, high, False)
    for name, (low, high) in _OPTIMIZER_FIELDS.items():
        number(cfg.optimizer[name], f"optimizer.{name}", low, high, False)
    number(cfg.optimizer.warmup_steps, "optimizer.warmup_steps", 0, INT32_MAX, True)
    if cfg.optimizer.learning_rate <= 0:
        raise ConfigError(f"config field `optimizer.learning_rate`: must be > 0, got {cfg.optimizer.learning_rate}")
    if cfg.optimizer.schedule not in SCHEDULES:
        raise ConfigError(f"config field `optimizer.schedule`: expected one of {SCHEDULES}, got "
                          f"{cfg.optimizer.schedule!r}")
    if cfg.batch_size % cfg.grad_accum_steps:
        raise ConfigError(f"config field `batch_size`: {cfg.batch_size} is not divisible by "
                          f"grad_accum_steps={cfg.grad_accum_steps}")
    for axis, size in cfg.mesh.items():
        if not isinstance(size, int) or isinstance(size, bool) or not (size == -1 or 1 <= size <= INT32_MAX):
            raise ConfigError(f"config field `mesh.{axis}`: must be a positive integer (or -1: the rest), got "
                              f"{size!r}")


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of a run: the file's model fields with the run's dtypes, remat policy and training
    recipe."""
    model = cfg.model.to_dict()
    config = from_hf_config(model, param_dtype=cfg.param_dtype,
                            compute_dtype=cfg.compute_dtype or model.get("compute_dtype", "bfloat16"))
    return config.replace(**training_numerics(cfg, config))
