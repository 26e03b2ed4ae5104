"""FP8 (E4M3) weight x high-precision activation matmul (W8A16), pure-JAX reference.

`fp8_matmul(x, w_kn, scale)` = x @ (float(w) * scale) with w stored float8_e4m3fn [K, N] (the nemojax
[in, out] layout) and a float32 scale per tensor (scalar) or per output channel ([N]). E4M3 values
are exact in bfloat16, so the weight is upcast to x's dtype without rounding and the scale applied
to the float32 product, where it costs one multiply per output instead of one per weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.errors import QuantizationError


def fp8_matmul(x: jax.Array, w_kn: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., K] @ dequantized w [K, N] -> [..., N] in x's dtype."""
    k, n = w_kn.shape
    scale = jnp.asarray(scale, jnp.float32)
    if x.shape[-1] != k or scale.shape not in ((), (n,)):
        raise QuantizationError(f"fp8_matmul: x {tuple(x.shape)}, weight {tuple(w_kn.shape)} and scale "
                                f"{tuple(scale.shape)} disagree (expected [..., K], [K, N], [] or [N])")
    y = jnp.dot(x, w_kn.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * scale).astype(x.dtype)
