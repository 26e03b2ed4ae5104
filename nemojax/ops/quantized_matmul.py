"""Dense matmuls with quantized weights and high-precision activations, pure-JAX references.

- `fp8_matmul(x, w_kn, scale)` (W8A16): w stored float8_e4m3fn [K, N] (the nemojax [in, out] layout)
  with a float32 scale per tensor (scalar) or per output channel ([N]). E4M3 values are exact in
  bfloat16, so the weight is upcast to x's dtype without rounding and the scale is applied to the
  float32 product (one multiply per output instead of one per weight).
- `nvfp4_matmul(x, packed_nk, block_scale_nk, global_scale)` (W4A16): the ModelOpt layout [N, K/2]
  (see `nemojax.quant.nvfp4`), dequantised to x's dtype, then x @ W.T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.errors import QuantizationError
from nemojax.quant.nvfp4 import dequantize


def fp8_matmul(x: jax.Array, w_kn: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., K] @ dequantized w [K, N] -> [..., N] in x's dtype."""
    k, n = w_kn.shape
    scale = jnp.asarray(scale, jnp.float32)
    if x.shape[-1] != k or scale.shape not in ((), (n,)):
        raise QuantizationError(f"fp8_matmul: x {tuple(x.shape)}, weight {tuple(w_kn.shape)} and scale "
                                f"{tuple(scale.shape)} disagree (expected [..., K], [K, N], [] or [N])")
    y = jnp.dot(x, w_kn.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * scale).astype(x.dtype)


def nvfp4_matmul(x: jax.Array, packed_nk: jax.Array, block_scale_nk: jax.Array, global_scale: jax.Array) -> jax.Array:
    """x [..., K] @ dequantize(packed [N, K/2], block_scale [N, K/16], global_scale []).T -> [..., N]."""
    if packed_nk.ndim != 2 or x.shape[-1] != 2 * packed_nk.shape[1]:
        raise QuantizationError(f"nvfp4_matmul: x {tuple(x.shape)} and packed weight {tuple(packed_nk.shape)} "
                                "disagree (expected [..., K] and [N, K/2])")
    w_nk = dequantize(packed_nk, block_scale_nk, global_scale, x.dtype)
    return jnp.einsum("...k,nk->...n", x, w_nk)
