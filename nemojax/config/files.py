"""Config files: the packaged configs (`nemojax.configs`), ml-collections `*.py` files, and
`config.json` files or checkpoint directories, all turned into a ModelConfig the same way."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
from types import ModuleType
from typing import Any

import nemojax.configs
from nemojax.config.hf import from_hf_config
from nemojax.config.model_config import ModelConfig
from nemojax.config.nemojax_dir import is_nemojax_dir, read_model_config
from nemojax.errors import ConfigError


def packaged_config_names() -> list[str]:
    """The configs shipped inside the package ("nano", "super", "tiny", "ultra", ...)."""
    return sorted(m.name for m in pkgutil.iter_modules(nemojax.configs.__path__))


def _module(spec: str) -> ModuleType:
    if spec in packaged_config_names():
        return importlib.import_module(f"nemojax.configs.{spec}")
    if not os.path.isfile(spec):
        raise ConfigError(f"no config file at {spec} (packaged configs: {packaged_config_names()})")
    module_spec = importlib.util.spec_from_file_location(f"nemojax_config_{abs(hash(spec))}", spec)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a config file is user code: any failure in it is a bad config
        raise ConfigError(f"{spec}: the config file failed to run ({type(e).__name__}: {e})") from e
    return module


def load_config_file(spec: str | os.PathLike) -> Any:
    """`get_config()` of a packaged config name ("tiny") or an ml-collections config file (`*.py`)."""
    spec = os.fspath(spec)
    module = _module(spec)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{spec} has no get_config()")
    return module.get_config()


def resolve_model_config(spec: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """A ModelConfig from a packaged config name ("tiny", "nano", ...), a `*.py` config file, a
    config.json file, a Hugging Face directory, or a nemojax model directory, training workdir or step
    directory."""
    spec = os.fspath(spec)
    if spec in packaged_config_names() or spec.endswith(".py"):
        loaded = load_config_file(spec)
        if not hasattr(loaded, "model") or not hasattr(loaded.model, "to_dict"):
            raise ConfigError(f"{spec}: get_config() has no `model` block")
        return from_hf_config(loaded.model.to_dict(), **overrides)
    if os.path.isdir(spec) and is_nemojax_dir(spec):
        return read_model_config(spec).replace(**overrides)
    if os.path.isdir(spec) or spec.endswith(".json"):
        return from_hf_config(spec, **overrides)
    raise ConfigError(f"unknown model config {spec!r}: expected one of {packaged_config_names()}, a *.py "
                      "config file, a config.json, or a checkpoint directory")
