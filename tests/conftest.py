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

if os.environ.get("NEMOJAX_TEST_SCAN_LAYERS") == "1":
    # Run the suite with every model's layers scanned (scan_layers=None resolves to True from 1 layer
    # on); tests that read per-layer variable paths do not apply in this mode.
    import nemojax.config.model_config as _model_config

    _model_config.SCAN_LAYERS_FROM = 1
