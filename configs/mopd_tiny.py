"""Thin entry: the packaged `nemojax.configs.mopd_tiny` (also reachable as `--config mopd_tiny`)."""

from nemojax.configs.mopd_tiny import get_config, get_model_config

__all__ = ["get_config", "get_model_config"]
