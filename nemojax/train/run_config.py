"""The training run configuration: defaults for every field, a configs/*.py file on top, then
`--config.a.b=value` overrides from the command line.

A config file only needs `model` (the published config fields); any training field it sets
replaces the default. Overrides are typed by the field they replace, so a typo or a wrong type
is a ConfigError naming the field.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from nemojax.config import ModelConfig, from_hf_config, load_config_file
from nemojax.errors import ConfigError
from nemojax.train.data import default_data_config
from nemojax.train.optimizer import default_optimizer_config

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
        optimizer=default_optimizer_config(),
        data=default_data_config(),
        mesh=dict(data=1, fsdp=-1, tensor=1, expert=1),  # -1: every device (of every process)
        model=ml_collections.ConfigDict(),
    ))


def _merge(base: ml_collections.ConfigDict, update: ml_collections.ConfigDict, where: str = "") -> None:
    """Copy `update` into `base`; nested blocks merge field by field, except `model`, which is replaced."""
    for key, value in update.items():
        name = f"{where}{key}"
        if name == "model" or key not in base:
            base[key] = value
        elif isinstance(base[key], ml_collections.ConfigDict) and isinstance(value, ml_collections.ConfigDict):
            _merge(base[key], value, name + ".")
        else:
            base[key] = value


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
            return float(text)
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
        raise ConfigError(f"--config.{name}: cannot read {text!r} as {type(current).__name__}") from e


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
        in_model = parents[:1] == ["model"]
        if key not in node and not in_model:
            raise ConfigError(f"--config.{name}: unknown field (known here: {sorted(node.keys())})")
        node[key] = _parse_value(text, node.get(key), name)


def load_run_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Defaults, then the config file's get_config(), then the overrides."""
    cfg = default_run_config()
    _merge(cfg, load_config_file(path))
    apply_overrides(cfg, overrides)
    if not cfg.model:
        raise ConfigError(f"{path}: get_config() has no `model` block")
    return cfg


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of a run: the file's model fields with the run's dtypes and remat policy."""
    model = cfg.model.to_dict()
    return from_hf_config(model, remat=cfg.remat, param_dtype=cfg.param_dtype,
                          compute_dtype=cfg.compute_dtype or model.get("compute_dtype", "bfloat16"))
