"""Thin entry: the packaged `nemojax.configs.nano` (also reachable as `--config nano`)."""

from nemojax.configs.nano import get_config, get_model_config

__all__ = ["get_config", "get_model_config"]
