"""NVFP4 grouped expert matmul kernel (pallas_kernels/fp4_moe.py) against dequantise-then-matmul.

The dequantisation here is written from the published NVFP4 / ModelOpt layout (FACTS.md): E2M1 codes,
element 2j in the low nibble of byte j, one E4M3 scale per 16 elements along K, one float32 scale
per expert. On CPU the kernel runs in JAX's GPU interpreter; it is also lowered for CUDA at the
Ultra expert shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fp4_moe

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _dequantize(packed, block_scale, global_scale) -> np.ndarray:
    packed = np.asarray(packed)
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    scale = np.repeat(np.asarray(block_scale.astype(jnp.float32)), 16, axis=-1)
    return E2M1[codes] * scale * np.asarray(global_scale)[:, None, None]


def _expected(x, packed, block_scale, global_scale, group_sizes) -> np.ndarray:
    weights = _dequantize(packed, block_scale, global_scale)
    x = np.asarray(x.astype(jnp.float32))
    out = np.zeros((x.shape[0], weights.shape[1]), np.float32)
    start = 0
    for expert, size in enumerate(np.asarray(group_sizes)):
        out[start:start + size] = x[start:start + size] @ weights[expert].T
        start += size
    return out


def _weights(num_experts, n, k, seed):
    ks = jax.random.split(jax.random.key(seed), 3)
    packed = jax.random.randint(ks[0], (num_experts, n, k // 2), 0, 256).astype(jnp.uint8)
    block_scale = (0.1 + 2 * jax.random.uniform(ks[1], (num_experts, n, k // 16))).astype(jnp.float8_e4m3fn)
    global_scale = 0.5 + jax.random.uniform(ks[2], (num_experts,))
    return packed, block_scale, global_scale


@pytest.mark.parametrize("dtype,num_experts,sizes,n,k", [
    # empty experts, rows past sum(group_sizes), N and K padded inside (K = 272 is not a multiple of 256)
    (jnp.bfloat16, 5, {0: 7, 2: 12, 4: 3}, 80, 272),
    (jnp.float32, 3, {1: 16, 2: 5}, 64, 256),
    # 512 experts (Super / Ultra), four of them used
    (jnp.bfloat16, 512, {0: 3, 7: 9, 100: 1, 511: 6}, 64, 256),
])
def test_grouped_matmul_matches_dequantize_then_matmul(dtype, num_experts, sizes, n, k):
    group_sizes = np.zeros(num_experts, np.int32)
    for expert, size in sizes.items():
        group_sizes[expert] = size
    m = int(group_sizes.sum()) + 2
    x = jax.random.normal(jax.random.key(1), (m, k)).astype(dtype)
    packed, block_scale, global_scale = _weights(num_experts, n, k, seed=2)
    out = fp4_moe.grouped_matmul(x, packed, block_scale, global_scale, jnp.asarray(group_sizes), interpret=True)
    expected = _expected(x, packed, block_scale, global_scale, group_sizes)
    assert out.shape == (m, n) and out.dtype == dtype
    out = np.asarray(out.astype(jnp.float32))
    assert not out[-2:].any(), "rows past sum(group_sizes) must be zero"
    tolerance = 1e-2 if dtype == jnp.bfloat16 else 1e-5  # bf16: the output's rounding
    np.testing.assert_allclose(out, expected, atol=tolerance * np.abs(expected).max(), rtol=0)


def test_every_e2m1_code_and_scale_decodes_exactly():
    """Byte value v in row v of the weight: one-hot rows of x read back its low and high nibble."""
    k = 256
    packed = jnp.broadcast_to(jnp.arange(256, dtype=jnp.uint8)[None, :, None], (1, 256, k // 2))
    scales = np.array([0.015625, 0.5, 1.0, 1.75, 3.0, 448.0, 0.001953125, 26.0], np.float32)
    block_scale = jnp.asarray(np.resize(scales, (1, 256, k // 16)), jnp.float8_e4m3fn)
    global_scale = jnp.asarray([0.75], jnp.float32)
    x = jnp.eye(2, k, dtype=jnp.float32)  # rows pick element 0 (low nibble) and element 1 (high nibble)
    out = fp4_moe.grouped_matmul(x, packed, block_scale, global_scale, jnp.asarray([2], jnp.int32), interpret=True)
    byte = np.arange(256)
    scale = np.asarray(block_scale[0, :, 0].astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(out[0]), E2M1[byte & 15] * scale * 0.75)
    np.testing.assert_array_equal(np.asarray(out[1]), E2M1[byte >> 4] * scale * 0.75)


def test_bad_shapes_raise():
    packed, block_scale, global_scale = _weights(2, 64, 256, seed=0)
    with pytest.raises(ValueError, match="packed"):
        fp4_moe.grouped_matmul(jnp.ones((4, 512), jnp.bfloat16), packed, block_scale, global_scale,
                               jnp.asarray([2, 2], jnp.int32))


@pytest.mark.parametrize("tile_tokens", [16, 128])
def test_lowers_for_cuda_at_ultra_expert_shapes(tile_tokens):
    """Ultra's routed expert up-projection: 512 experts of 5120 x 2048, 64 tokens x top-22 rows."""
    num_experts, n, k, m = 512, 5120, 2048, 64 * 22
    args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((num_experts, n, k // 2), jnp.uint8),
            jax.ShapeDtypeStruct((num_experts, n, k // 16), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((num_experts,), jnp.float32), jax.ShapeDtypeStruct((num_experts,), jnp.int32))
    fn = lambda *a: fp4_moe.grouped_matmul(*a, tile_tokens=tile_tokens)
    assert "mosaic_gpu" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
