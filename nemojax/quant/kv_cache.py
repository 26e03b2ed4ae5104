"""FP8 (E4M3) KV cache with one float32 scale per tensor (per attention layer, for keys and for values).

    stored = e4m3(clip(x / scale, ±448))     (round to nearest even)
    read   = float(stored) * scale

`scale` is the checkpoint's `k_scale` / `v_scale` (ModelOpt: amax / 448 over calibration data) when it
has them, else 1 (vLLM's default for an FP8 cache without scales): values beyond ±448·scale saturate.
A cache of any other dtype stores x cast to it and reads it back unscaled (`scale` is ignored).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.quant.fp8 import E4M3_MAX

FP8 = jnp.dtype(jnp.float8_e4m3fn)


def is_fp8(dtype: jnp.dtype) -> bool:
    return jnp.dtype(dtype) == FP8


def to_cache(x: jax.Array, scale: jax.Array | float, dtype: jnp.dtype) -> jax.Array:
    """What a cache of `dtype` stores for the values `x`."""
    if not is_fp8(dtype):
        return x.astype(dtype)
    scaled = x.astype(jnp.float32) / jnp.asarray(scale, jnp.float32)
    return jnp.clip(scaled, -E4M3_MAX, E4M3_MAX).astype(FP8)


def from_cache(stored: jax.Array, scale: jax.Array | float, dtype: jnp.dtype) -> jax.Array:
    """The values a cache entry stands for, in the compute `dtype`."""
    if not is_fp8(stored.dtype):
        return stored.astype(dtype)
    return (stored.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)).astype(dtype)
