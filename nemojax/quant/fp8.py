"""FP8 (E4M3) weights with a float32 scale per tensor or per channel, as ModelOpt exports them.

    scale = amax / 448          (over the tensor, or over everything but `channel_axis`)
    q     = e4m3(w / scale)     (round to nearest even; |w / scale| <= 448 by construction)
    w    ~= float(q) * scale

An all-zero tensor (or channel) gets scale 0 and zeros, never NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nemojax.errors import QuantizationError
from nemojax.quant.common import check_floating_finite, exact_div

E4M3_MAX = 448.0


def _scale_shape(scale: jax.Array, ndim: int, channel_axis: int | None) -> jax.Array:
    """The scale broadcast against a tensor of rank `ndim`."""
    if channel_axis is None:
        return scale
    axis = channel_axis % ndim
    return jnp.expand_dims(scale, tuple(a for a in range(ndim) if a != axis))


def quantize(w: jax.Array, channel_axis: int | None = None, name: str = "tensor") -> tuple[jax.Array, jax.Array]:
    """w -> (q float8_e4m3fn, same shape; scale float32: a scalar, or [w.shape[channel_axis]])."""
    w = jnp.asarray(w)
    if channel_axis is not None and not -w.ndim <= channel_axis < w.ndim:
        raise QuantizationError(f"{name}: channel_axis {channel_axis} out of range for shape {tuple(w.shape)}")
    check_floating_finite(w, name, "FP8")
    return _quantize(w, channel_axis)


@functools.partial(jax.jit, static_argnums=1)
def _quantize(w: jax.Array, channel_axis: int | None) -> tuple[jax.Array, jax.Array]:
    w32 = w.astype(jnp.float32)
    reduce = None if channel_axis is None else tuple(a for a in range(w.ndim) if a != channel_axis % w.ndim)
    scale = exact_div(jnp.max(jnp.abs(w32), axis=reduce), E4M3_MAX)
    full = _scale_shape(scale, w.ndim, channel_axis)
    scaled = jnp.where(full > 0, exact_div(w32, jnp.where(full > 0, full, 1.0)), 0.0)
    return jnp.clip(scaled, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn), scale


def dequantize(q: jax.Array, scale: jax.Array, channel_axis: int | None = None,
               dtype: jnp.dtype | str = jnp.float32) -> jax.Array:
    """float(q) * scale in `dtype` (float32 arithmetic)."""
    q, scale = jnp.asarray(q), jnp.asarray(scale, jnp.float32)
    want = () if channel_axis is None else (q.shape[channel_axis],)
    if scale.shape != want:
        raise QuantizationError(f"FP8 scale shape {tuple(scale.shape)} does not fit weight {tuple(q.shape)} "
                                f"(expected {want})")
    return _dequantize(q, scale, channel_axis, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dequantize(q: jax.Array, scale: jax.Array, channel_axis: int | None, dtype: jnp.dtype) -> jax.Array:
    return (q.astype(jnp.float32) * _scale_shape(scale, q.ndim, channel_axis)).astype(dtype)
