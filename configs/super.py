"""Thin entry: the packaged `nemojax.configs.super` (also reachable as `--config super`)."""

from nemojax.configs.super import get_config, get_model_config

__all__ = ["get_config", "get_model_config"]
