"""NVFP4 numerics, in the ModelOpt layout that NVIDIA publishes its checkpoints in.

A value is an E2M1 code (±{0, 0.5, 1, 1.5, 2, 3, 4, 6}) times an E4M3 scale shared by a block of 16
consecutive elements along the input (K) dimension, times one float32 scale per tensor:

    W[n, k] = e2m1(code[n, k]) * float(block_scale[n, k // 16]) * global_scale

Quantisation is ModelOpt's formula, so that our bytes equal the published ones:

    global_scale = amax(W) / (6 * 448)
    block_scale  = e4m3(amax(block) / (6 * global_scale))     (1.0 for an all-zero block)
    code         = rne(W / (float(block_scale) * global_scale))  (ties to the even code, saturating at ±6)

Codes are packed two per byte, the even element in the low nibble; bit 3 of a nibble is the sign
(set for negative inputs, also when they round to zero). An all-zero tensor gets global scale 0 and
codes 0; a block whose scale underflows E4M3 to 0 gets codes 0 (it dequantises to 0 either way).
Stacked weights [E, N, K] (experts) get one global scale per leading index.

`fake_quantize` is the same numerics over any 2D block shape with an optional stochastic rounding,
returning dequantised values: the building block of the NVFP4 training recipe.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.errors import QuantizationError
from nemojax.quant.common import check_floating_finite, exact_div

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of codes 0..7
# Midpoint i lies between codes i and i+1; a value exactly on it rounds to the even code, i.e. up
# where i + 1 is even (midpoints 0.75, 1.75, 3.5) and down elsewhere.
_MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
_TIE_UP = np.array([False, True, False, True, False, True, False])
SIGN_BIT = 8


def round_to_e2m1(x: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """E2M1 codes (uint8, 0..15) of float32 values already divided by their scales.

    Round to nearest, ties to even, saturating at ±6; with `key`, stochastic rounding instead: a
    magnitude between grid points lo < hi rounds up with probability (|x| - lo) / (hi - lo), so the
    expected value is x (for |x| <= 6).
    """
    x = jnp.asarray(x, jnp.float32)
    mag = jnp.abs(x)
    if key is None:
        above = jnp.where(_TIE_UP, mag[..., None] >= _MIDPOINTS, mag[..., None] > _MIDPOINTS)
        code = jnp.sum(above, axis=-1, dtype=jnp.int32)
    else:
        grid = jnp.asarray(E2M1_GRID, jnp.float32)
        mag = jnp.minimum(mag, E2M1_MAX)
        low = jnp.sum(mag[..., None] >= grid[1:], axis=-1, dtype=jnp.int32)
        high = jnp.minimum(low + 1, len(E2M1_GRID) - 1)
        gap = grid[high] - grid[low]
        frac = jnp.where(gap > 0, (mag - grid[low]) / jnp.where(gap > 0, gap, 1.0), 0.0)
        code = low + (jax.random.uniform(key, mag.shape) < frac).astype(jnp.int32)
    return (code + jnp.where(x < 0, SIGN_BIT, 0)).astype(jnp.uint8)


def e2m1_value(codes: jax.Array) -> jax.Array:
    """float32 values of E2M1 codes (uint8, 0..15)."""
    codes = jnp.asarray(codes).astype(jnp.int32)
    magnitude = jnp.asarray(E2M1_GRID, jnp.float32)[codes & 7]
    return jnp.where(codes & SIGN_BIT, -magnitude, magnitude)


def pack_codes(codes: jax.Array) -> jax.Array:
    """[..., K] codes -> [..., K/2] bytes, element 2j in the low nibble, 2j+1 in the high one."""
    codes = jnp.asarray(codes, jnp.uint8)
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_codes(packed: jax.Array) -> jax.Array:
    """[..., K/2] bytes -> [..., K] codes (the inverse of `pack_codes`)."""
    packed = jnp.asarray(packed, jnp.uint8)
    both = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
    return both.reshape(packed.shape[:-1] + (2 * packed.shape[-1],))


def _blocks(x: jax.Array, block: tuple[int, int]) -> jax.Array:
    """[..., R, C] -> [..., R/br, br, C/bc, bc]."""
    *lead, rows, cols = x.shape
    br, bc = block
    return x.reshape(*lead, rows // br, br, cols // bc, bc)


def _block_scales(block_amax: jax.Array, global_scale: jax.Array) -> jax.Array:
    """E4M3 scales of blocks with these amaxes (`global_scale` broadcast to them): amax / (6 * gs),
    1.0 where the block is all zero (ModelOpt's rule, which also keeps 0/0 out)."""
    ratio = exact_div(block_amax, E2M1_MAX * global_scale)
    ratio = jnp.where(block_amax > 0, jnp.minimum(ratio, E4M3_MAX), 1.0)
    return ratio.astype(jnp.float8_e4m3fn)


def _quantize_blocks(x: jax.Array, block: tuple[int, int], global_scale: jax.Array,
                     key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Codes [..., R, C] and E4M3 scales [..., R/br, C/bc] of float32 `x` over blocks of `block`;
    `global_scale` has x's leading shape (one scale per [R, C] matrix)."""
    xb = _blocks(x, block)
    gs = global_scale[..., None, None, None, None]
    scales = _block_scales(jnp.max(jnp.abs(xb), axis=(-3, -1)), gs[..., 0, 0])
    denom = scales.astype(jnp.float32)[..., :, None, :, None] * gs
    scaled = jnp.where(denom > 0, exact_div(xb, jnp.where(denom > 0, denom, 1.0)), 0.0)
    return round_to_e2m1(scaled, key).reshape(x.shape), scales


def _dequantize_blocks(codes: jax.Array, scales: jax.Array, block: tuple[int, int],
                       global_scale: jax.Array) -> jax.Array:
    """float32 (e2m1(code) * block scale) * global scale; the inverse layout of `_quantize_blocks`."""
    values = _blocks(e2m1_value(codes), block)
    out = values * scales.astype(jnp.float32)[..., :, None, :, None]
    return (out * global_scale[..., None, None, None, None]).reshape(codes.shape)


def global_scale_of(w: jax.Array, axes: tuple[int, ...] = (-2, -1)) -> jax.Array:
    """amax(w) / (6 * 448) over `axes`, float32."""
    return exact_div(jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), axis=axes), E2M1_MAX * E4M3_MAX)


def check_quantizable(w: jax.Array, name: str = "tensor") -> None:
    """Raise QuantizationError unless `w` is a floating [..., N, K] array with K % 16 == 0 and, when its
    values are known (not under tracing), all finite."""
    if w.ndim < 2 or w.shape[-1] % BLOCK:
        raise QuantizationError(f"{name}: shape {tuple(w.shape)} cannot be NVFP4-quantized "
                                f"(expected [..., N, K] with K a multiple of {BLOCK})")
    check_floating_finite(w, name, "NVFP4")


def quantize(w: jax.Array, name: str = "tensor") -> tuple[jax.Array, jax.Array, jax.Array]:
    """w [..., N, K] -> (packed uint8 [..., N, K/2], block_scale float8_e4m3fn [..., N, K/16],
    global_scale float32 [...]): ModelOpt's NVFP4 weight quantisation, one global scale per [N, K]."""
    w = jnp.asarray(w)
    check_quantizable(w, name)
    return _quantize(w)


@jax.jit
def _quantize(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    w32 = w.astype(jnp.float32)
    gs = global_scale_of(w32)
    codes, scales = _quantize_blocks(w32, (1, BLOCK), gs)
    return pack_codes(codes), scales.reshape(w.shape[:-1] + (w.shape[-1] // BLOCK,)), gs


def dequantize(packed: jax.Array, block_scale: jax.Array, global_scale: jax.Array,
               dtype: jnp.dtype | str = jnp.float32) -> jax.Array:
    """(packed [..., N, K/2], block_scale [..., N, K/16], global_scale [...]) -> W [..., N, K] in `dtype`."""
    packed, block_scale, global_scale = (jnp.asarray(a) for a in (packed, block_scale, global_scale))
    lead, (n, half) = packed.shape[:-2], packed.shape[-2:]
    if block_scale.shape != lead + (n, 2 * half // BLOCK) or global_scale.shape != lead or (2 * half) % BLOCK:
        raise QuantizationError(
            f"NVFP4 tensors disagree: packed {tuple(packed.shape)}, block_scale {tuple(block_scale.shape)}, "
            f"global_scale {tuple(global_scale.shape)} (expected [..., N, K/2], [..., N, K/16], [...])")
    return _dequantize(packed, block_scale, global_scale, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=3)
def _dequantize(packed: jax.Array, block_scale: jax.Array, global_scale: jax.Array, dtype: jnp.dtype) -> jax.Array:
    out = _dequantize_blocks(unpack_codes(packed), block_scale, (1, BLOCK), global_scale.astype(jnp.float32))
    return out.astype(dtype)


@functools.partial(jax.jit, static_argnums=1)
def fake_quantize(x: jax.Array, block: tuple[int, int] = (1, BLOCK), key: jax.Array | None = None) -> jax.Array:
    """float32 x [..., R, C] quantised to NVFP4 over blocks `block` (R, C multiples of it) with one global
    scale for the whole tensor, and dequantised again; `key` switches to stochastic rounding."""
    x = jnp.asarray(x, jnp.float32)
    gs = global_scale_of(x, tuple(range(x.ndim)))
    gs = jnp.broadcast_to(gs, x.shape[:-2])
    codes, scales = _quantize_blocks(x, block, gs, key)
    return _dequantize_blocks(codes, scales, block, gs)
