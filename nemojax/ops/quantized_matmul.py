"""Dense matmuls with quantized weights and high-precision activations, pure-JAX references.

- `fp8_matmul(x, w_kn, scale)` (W8A16): w stored float8_e4m3fn [K, N] (the nemojax [in, out] layout)
  with a float32 scale per tensor (scalar) or per output channel ([N]). E4M3 values are exact in
  bfloat16, so the weight is upcast to x's dtype without rounding and the scale is applied to the
  float32 product (one multiply per output instead of one per weight).
- `nvfp4_matmul(x, packed_nk, block_scale_nk, global_scale)` (W4A16): the ModelOpt layout [N, K/2]
  (see `nemojax.quant.nvfp4`), dequantised to x's dtype, then x @ W.T.
- `grouped_fp8_matmul(x, w_ekn, scale_e, group_sizes)`: FP8 experts through `grouped_matmul` (which
  upcasts only the routed experts, exactly), each row's output scaled by its expert's scale. (NVFP4
  experts have their own op, `nemojax.ops.grouped_matmul_nvfp4`.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.errors import QuantizationError
from nemojax.ops.grouped_matmul import grouped_matmul
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


def grouped_fp8_matmul(x_mk: jax.Array, w_ekn: jax.Array, scale_e: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
    """Rows sorted by expert: out[i] = x[i] @ (float(w[e]) * scale[e]) with e = group(i); [M, N] in x's dtype,
    zeros past sum(group_sizes)."""
    if scale_e.shape != w_ekn.shape[:1] or x_mk.shape[-1] != w_ekn.shape[1]:
        raise QuantizationError(f"grouped_fp8_matmul: x {tuple(x_mk.shape)}, weight {tuple(w_ekn.shape)} and scale "
                                f"{tuple(scale_e.shape)} disagree (expected [M, K], [E, K, N], [E])")
    y = grouped_matmul(x_mk, w_ekn, group_sizes_e, preferred_element_type=jnp.float32)
    row = jnp.arange(x_mk.shape[0], dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_sizes_e), row, side="right"), w_ekn.shape[0] - 1)
    return (y * scale_e.astype(jnp.float32)[group][:, None]).astype(x_mk.dtype)
