"""Test set-up: 8 simulated CPU devices (for mesh tests) and float32 matmuls everywhere.

A caller's XLA_FLAGS are kept; the device count is added unless the caller already set one.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
