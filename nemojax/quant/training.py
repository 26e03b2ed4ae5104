"""The NVFP4 training recipe (arXiv 2509.25149, as used for Nemotron 3 Super/Ultra) for linear maps:
`nvfp4_train_matmul` (one weight) and `nvfp4_train_grouped_matmul` (routed experts, rows sorted by expert).

All three GEMMs of `nvfp4_train_matmul(x, w, key)` take NVFP4-quantised inputs:
- fprop  y  = Q(x) @ Q2d(w)                       x: 1x16 blocks along K, round to nearest
- dgrad  dx = Qsr(dy) @ Q2d(w).T                  dy: 1x16 blocks along N, stochastic rounding
- wgrad  dw = Q(H x).T @ Qsr(H dy)                1x16 blocks along the tokens, after a 16x16 random
                                                  Hadamard transform H over the tokens
Q2d(w) uses 16x16 blocks, so forward and backward see the same quantised weight whichever dimension
they contract. H is orthogonal (H.T H = I), so the transform changes only how the outliers spread
over blocks, not the product. Each quantised tensor has its own float32 global scale. Stochastic
rounding is used on gradients only. There is no FP4 GEMM here: the quantised values are exact in
float32 and every product is computed in float32 (Precision.HIGHEST), as an FP4 tensor core with
float32 accumulation would; dims are zero-padded to multiples of 16 where needed.

For experts each expert's weight has its own global scale, and the wgrad blocks and Hadamard
blocks run over 16 consecutive tokens of one expert (each expert's rows padded to a multiple of 16);
the weight gradient is the transpose of the grouped matmul (`jax.vjp` of
`nemojax.ops.grouped_matmul`, so it is the same op on every backend).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.ops.grouped_matmul import grouped_matmul
from nemojax.ops.grouped_matmul_nvfp4 import tile_layout
from nemojax.quant.nvfp4 import BLOCK, fake_quantize

HADAMARD_SIZE = 16
_HIGHEST = jax.lax.Precision.HIGHEST


def hadamard_matrix(size: int = HADAMARD_SIZE) -> np.ndarray:
    """The orthonormal Sylvester Hadamard matrix of a power-of-two size (entries ±1/sqrt(size))."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    if h.shape[0] != size:
        raise ValueError(f"Hadamard size {size} is not a power of two")
    return h / np.sqrt(size, dtype=np.float32)


def random_hadamard(key: jax.Array, size: int = HADAMARD_SIZE) -> jax.Array:
    """H @ diag(s) with random signs s: orthogonal, a different rotation for each key."""
    signs = jnp.where(jax.random.bernoulli(key, 0.5, (size,)), 1.0, -1.0)
    return jnp.asarray(hadamard_matrix(size)) * signs[None, :]


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _quantized_weight(w_kn: jax.Array) -> jax.Array:
    """Q2d(w): 16x16 blocks, round to nearest, float32 [K, N] (padding removed)."""
    padded = _pad_to(_pad_to(w_kn.astype(jnp.float32), 0, BLOCK), 1, BLOCK)
    return fake_quantize(padded, (BLOCK, BLOCK))[: w_kn.shape[0], : w_kn.shape[1]]


def _quantized_rows(x_tc: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """1x16 blocks along the last dim of [T, C] (C padded to a multiple of 16), float32."""
    padded = _pad_to(x_tc.astype(jnp.float32), 1, BLOCK)
    return fake_quantize(padded, (1, BLOCK), key)[:, : x_tc.shape[1]]


def _token_hadamard(x_tc: jax.Array, h: jax.Array) -> jax.Array:
    """H applied to every 16 consecutive tokens: [T, C] -> [T', C] (T' = T rounded up to 16)."""
    padded = _pad_to(x_tc.astype(jnp.float32), 0, HADAMARD_SIZE)
    blocks = padded.reshape(-1, HADAMARD_SIZE, padded.shape[1])
    return jnp.einsum("ij,bjc->bic", h, blocks, precision=_HIGHEST).reshape(padded.shape)


def fprop(x_tk: jax.Array, w_kn: jax.Array) -> jax.Array:
    """Q(x) @ Q2d(w) in float32."""
    return jnp.dot(_quantized_rows(x_tk), _quantized_weight(w_kn), precision=_HIGHEST)


def dgrad(dy_tn: jax.Array, w_kn: jax.Array, key: jax.Array) -> jax.Array:
    """Qsr(dy) @ Q2d(w).T in float32."""
    return jnp.dot(_quantized_rows(dy_tn, key), _quantized_weight(w_kn).T, precision=_HIGHEST)


def wgrad(x_tk: jax.Array, dy_tn: jax.Array, key: jax.Array) -> jax.Array:
    """Q(H x).T @ Qsr(H dy) in float32, blocks of 16 along the tokens."""
    rotation_key, rounding_key = jax.random.split(key)
    h = random_hadamard(rotation_key)
    xq_kt = _quantized_rows(_token_hadamard(x_tk, h).T)
    dyq_nt = _quantized_rows(_token_hadamard(dy_tn, h).T, rounding_key)
    return jnp.dot(xq_kt, dyq_nt.T, precision=_HIGHEST)


@jax.custom_vjp
def nvfp4_train_matmul(x: jax.Array, w_kn: jax.Array, key: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N] with NVFP4-quantised inputs in all three GEMMs; `key` (a typed PRNG key)
    drives the stochastic rounding and the Hadamard signs of the backward pass. Returns x's dtype."""
    return fprop(x.reshape(-1, x.shape[-1]), w_kn).reshape(x.shape[:-1] + (w_kn.shape[1],)).astype(x.dtype)


def _fwd(x, w_kn, key):
    return nvfp4_train_matmul(x, w_kn, key), (x, w_kn, key)


def _bwd(residuals, dy):
    x, w_kn, key = residuals
    x_tk, dy_tn = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dgrad_key, wgrad_key = jax.random.split(key)
    dx = dgrad(dy_tn, w_kn, dgrad_key).reshape(x.shape).astype(x.dtype)
    dw = wgrad(x_tk, dy_tn, wgrad_key).astype(w_kn.dtype)
    return dx, dw, None


nvfp4_train_matmul.defvjp(_fwd, _bwd)


def _quantized_experts(w_ekn: jax.Array) -> jax.Array:
    """Q2d of each expert's [K, N] weight (its own global scale), float32."""
    return jax.vmap(_quantized_weight)(w_ekn)


@jax.custom_vjp
def nvfp4_train_grouped_matmul(x_mk: jax.Array, w_ekn: jax.Array, group_sizes_e: jax.Array,
                               key: jax.Array) -> jax.Array:
    """`grouped_matmul(x, w, group_sizes)` (rows sorted by expert) with the NVFP4 recipe on all three
    GEMMs; returns x's dtype, zeros past sum(group_sizes)."""
    y = grouped_matmul(_quantized_rows(x_mk), _quantized_experts(w_ekn), group_sizes_e,
                       preferred_element_type=jnp.float32)
    return y.astype(x_mk.dtype)


def _grouped_fwd(x_mk, w_ekn, group_sizes_e, key):
    return nvfp4_train_grouped_matmul(x_mk, w_ekn, group_sizes_e, key), (x_mk, w_ekn, group_sizes_e, key)


def _grouped_bwd(residuals, dy_mn):
    x_mk, w_ekn, sizes, key = residuals
    sizes = sizes.astype(jnp.int32)
    dgrad_key, rotation_key, rounding_key = jax.random.split(key, 3)
    w_q = _quantized_experts(w_ekn)
    dx = grouped_matmul(_quantized_rows(dy_mn, dgrad_key), jnp.swapaxes(w_q, 1, 2), sizes,
                        preferred_element_type=jnp.float32).astype(x_mk.dtype)
    # wgrad: every expert's rows padded to 16 so that Hadamard and quantisation blocks stay in one expert.
    src, real, _, _ = tile_layout(sizes, x_mk.shape[0], HADAMARD_SIZE)
    h = random_hadamard(rotation_key)
    x_sk = jnp.where(real[:, None], x_mk[src], 0)
    dy_sn = jnp.where(real[:, None], dy_mn[src], 0)
    xq_sk = _quantized_rows(_token_hadamard(x_sk, h).T).T
    dyq_sn = _quantized_rows(_token_hadamard(dy_sn, h).T, rounding_key).T
    padded = -(-sizes // HADAMARD_SIZE) * HADAMARD_SIZE
    _, transpose = jax.vjp(lambda w: grouped_matmul(xq_sk, w, padded, preferred_element_type=jnp.float32),
                           jnp.zeros(w_ekn.shape, jnp.float32))
    (dw,) = transpose(dyq_sn)
    return dx, dw.astype(w_ekn.dtype), None, None


nvfp4_train_grouped_matmul.defvjp(_grouped_fwd, _grouped_bwd)
