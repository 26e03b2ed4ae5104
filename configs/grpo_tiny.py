"""Thin entry: the packaged `nemojax.configs.grpo_tiny` (also reachable as `--config grpo_tiny`)."""

from nemojax.configs.grpo_tiny import get_config, get_model_config

__all__ = ["get_config", "get_model_config"]
