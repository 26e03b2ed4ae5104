"""Thin entry: the packaged `nemojax.configs.tiny` (also reachable as `--config tiny`)."""

from nemojax.configs.tiny import get_config, get_model_config

__all__ = ["get_config", "get_model_config"]
