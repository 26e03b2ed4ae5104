"""The config.json of nemojax's own directories (model directory, training workdir, step directory):
writing it, reading it back, and finding it. No Orbax and no model code here, so config resolution
(`nemojax.config.files`) reads these directories without importing the checkpoint package, which
imports this module for the same names.
"""

from __future__ import annotations

import json
import os
from typing import Any

from nemojax.config.model_config import ModelConfig, from_dict
from nemojax.errors import CheckpointError

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
# The in-memory variable layout the checkpoint was written in; 2: Mamba in_proj / conv1d group-major;
# 3: as 2, and the main stack per layer or stacked per kind as the model config's `scan_layers` says
# (version 2 files are always per layer and still read).
LAYOUT_VERSION = 3
READABLE_VERSIONS = (2, 3)


def write_config(directory: str, config: ModelConfig, **extra: Any) -> None:
    """Write `config.json` with the model config (and any extra sections, such as the run config)."""
    os.makedirs(directory, exist_ok=True)
    payload = {"format": "nemojax", "layout_version": LAYOUT_VERSION, "model": config.to_dict(), **extra}
    tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))


def read_config(directory: str) -> dict[str, Any]:
    """The parsed `config.json` of a nemojax directory; CheckpointError when absent, not ours, or written
    in another variable layout."""
    payload = _read_payload(directory)
    if payload.get("layout_version", 1) == 2:  # written before scanned layers: per-layer variables
        payload["model"] = dict(payload["model"], scan_layers=False)
    if payload.get("layout_version", 1) not in READABLE_VERSIONS:
        raise CheckpointError(f"{os.path.join(directory, CONFIG_FILE)}: variables in layout version "
                              f"{payload.get('layout_version', 1)}, this nemojax reads versions {READABLE_VERSIONS} "
                              "(Mamba in_proj/conv1d stored group-major); convert the model again from its "
                              "Hugging Face checkpoint")
    return payload


def _read_payload(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            payload = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}") from e
    except IsADirectoryError as e:
        raise CheckpointError(f"{path} is a directory, not a config file") from e
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != "nemojax" or not isinstance(payload.get("model"),
                                                                                              dict):
        raise CheckpointError(f"{path} is not a nemojax config (no \"format\": \"nemojax\" and \"model\")")
    return payload


def is_nemojax_dir(directory: str) -> bool:
    """True when `directory` (or, for a step directory, its workdir) carries a nemojax config.json."""
    try:
        _read_payload(config_dir(directory))
        return True
    except CheckpointError:
        return False


def config_dir(directory: str) -> str:
    """Where config.json lives: the directory itself, or the workdir above a step directory."""
    parent = os.path.dirname(os.path.normpath(directory))
    if os.path.basename(os.path.normpath(directory)).isdigit() and os.path.basename(parent) == CHECKPOINTS_DIR:
        return os.path.dirname(parent)
    return directory


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a model directory, a training workdir or a step directory (nothing else is read)."""
    directory = os.path.abspath(os.fspath(path))
    return from_dict(read_config(config_dir(directory))["model"])
