"""Thin entry: the packaged `nemojax.configs.ultra` (also reachable as `--config ultra`)."""

from nemojax.configs.ultra import get_config, get_model_config

__all__ = ["get_config", "get_model_config"]
