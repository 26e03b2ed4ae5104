"""Thin entry: the packaged `nemojax.configs.sft_tiny` (also reachable as `--config sft_tiny`)."""

from nemojax.configs.sft_tiny import get_config, get_model_config

__all__ = ["get_config", "get_model_config"]
