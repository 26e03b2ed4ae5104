"""NVFP4 and FP8 numerics against independent oracles: ml_dtypes' E2M1/E4M3 casts, the published
ModelOpt formula written out in numpy, and blocks computed by hand."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nemojax.errors import QuantizationError
from nemojax.quant import fp8, nvfp4

F4 = ml_dtypes.float4_e2m1fn
F8 = ml_dtypes.float8_e4m3fn


def _modelopt_nvfp4(w: np.ndarray):
    """The published formula in numpy, every rounding done by an ml_dtypes cast (not by our code)."""
    w = np.asarray(w, np.float32)
    gs = (np.max(np.abs(w), axis=(-2, -1)) / np.float32(6 * 448)).astype(np.float32)
    blocks = w.reshape(w.shape[:-1] + (w.shape[-1] // 16, 16))
    amax = np.max(np.abs(blocks), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = amax / (np.float32(6) * gs[..., None, None])
    scale = np.where(amax == 0, np.float32(1), ratio).astype(F8)
    denom = scale.astype(np.float32) * gs[..., None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(denom[..., None] > 0, blocks / denom[..., None], 0).astype(np.float32)
    codes = scaled.astype(F4).view(np.uint8).reshape(w.shape)
    return (codes[..., 1::2] << 4) | codes[..., 0::2], scale, gs


def test_e2m1_rounding_equals_ml_dtypes_including_ties():
    grid = np.array(nvfp4.E2M1_GRID, np.float32)
    mids = (grid[1:] + grid[:-1]) / 2
    x = np.concatenate([grid, mids, mids + 1e-3, mids - 1e-3, [6.5, 7, 1e9, 0.01, 5.9999]]).astype(np.float32)
    x = np.concatenate([x, -x[x > 0]])
    ours = np.asarray(nvfp4.round_to_e2m1(x))
    np.testing.assert_array_equal(ours, x.astype(F4).view(np.uint8))
    # Ties by hand: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4 (the even code each time).
    ties = np.asarray(nvfp4.e2m1_value(nvfp4.round_to_e2m1(mids)))
    np.testing.assert_array_equal(ties, [0, 1, 1, 2, 2, 4, 4])


def test_e2m1_values_of_all_codes_equal_ml_dtypes():
    codes = np.arange(16, dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(nvfp4.e2m1_value(codes)), codes.view(F4).astype(np.float32))


def test_packing_puts_the_even_element_in_the_low_nibble():
    codes = jnp.array([[1, 2, 15, 8]], jnp.uint8)
    packed = nvfp4.pack_codes(codes)
    np.testing.assert_array_equal(packed, [[0x21, 0x8F]])
    np.testing.assert_array_equal(nvfp4.unpack_codes(packed), codes)


@pytest.mark.parametrize("shape,dtype", [((8, 64), np.float32), ((3, 4, 32), np.float32),
                                         ((5, 48), ml_dtypes.bfloat16)])
def test_quantize_bytes_equal_the_modelopt_formula(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 30.0], size=shape[:-1] + (1,))).astype(dtype)
    w[..., :16] *= 1e-4  # blocks far below the tensor's amax use E4M3's small and subnormal scales
    packed, scale, gs = nvfp4.quantize(jnp.asarray(w))
    want_packed, want_scale, want_gs = _modelopt_nvfp4(w)
    assert packed.dtype == jnp.uint8 and scale.dtype == jnp.float8_e4m3fn and gs.dtype == jnp.float32
    assert packed.shape == shape[:-1] + (shape[-1] // 2,) and scale.shape == shape[:-1] + (shape[-1] // 16,)
    assert gs.shape == shape[:-2]
    np.testing.assert_array_equal(gs, want_gs)
    np.testing.assert_array_equal(np.asarray(scale).view(np.uint8), want_scale.view(np.uint8))
    np.testing.assert_array_equal(packed, want_packed)


def test_hand_computed_block():
    # Tensor amax 6 * 448 makes the global scale exactly 1; the first block's scale is 448, the second's
    # 3 * 448 / 6 = 224: every quotient below is exact, so the rounding is all that is tested.
    first = np.array([6, 4, 3, 2.5, 1.75, 0.75, 0.25, 1.25, 3.5, 5, -0.5, -6, 0, 0.1, 5.1, 2.9], np.float32)
    second = np.array([3, -3, 1.5, 0.75, 0.375, 1.125, 0.625, 2.75, 0, 0, 0, 0, 0, 0, 0, 0], np.float32)
    w = np.stack([np.concatenate([first * 448, second * 448])])
    packed, scale, gs = nvfp4.quantize(jnp.asarray(w))
    assert float(gs) == 1.0
    np.testing.assert_array_equal(np.asarray(scale, np.float32), [[448, 224]])
    codes = np.asarray(nvfp4.unpack_codes(packed))[0]
    # 2.5 -> 2, 1.75 -> 2, 0.75 -> 1, 0.25 -> 0, 1.25 -> 1, 3.5 -> 4, 5 -> 4, 0.1 -> 0, 5.1 -> 6, 2.9 -> 3.
    np.testing.assert_array_equal(codes[:16], [7, 6, 5, 4, 4, 2, 0, 2, 6, 6, 9, 15, 0, 0, 7, 5])
    # second block / 224 = [6, -6, 3, 1.5, 0.75->1, 2.25->2, 1.25->1, 5.5->6, 0...]
    np.testing.assert_array_equal(codes[16:], [7, 15, 5, 3, 2, 4, 2, 7, 0, 0, 0, 0, 0, 0, 0, 0])
    assert int(packed[0, 0]) == (6 << 4) | 7
    back = np.asarray(nvfp4.dequantize(packed, scale, gs))[0]
    np.testing.assert_array_equal(back[:4], np.array([6, 4, 3, 2]) * 448)


def test_zero_blocks_and_zero_tensors_give_zeros():
    w = np.zeros((2, 32), np.float32)
    w[0, 16:] = np.linspace(-1, 1, 16)
    packed, scale, gs = nvfp4.quantize(jnp.asarray(w))
    assert float(scale[0, 0].astype(jnp.float32)) == 1.0 and float(scale[1, 1].astype(jnp.float32)) == 1.0
    back = nvfp4.dequantize(packed, scale, gs)
    np.testing.assert_array_equal(back[:, :16], 0)
    np.testing.assert_array_equal(back[1], 0)
    packed, scale, gs = nvfp4.quantize(jnp.zeros((3, 16, 32)))
    back = nvfp4.dequantize(packed, scale, gs)
    assert np.all(np.asarray(gs) == 0) and np.all(np.asarray(back) == 0)
    assert np.all(np.isfinite(nvfp4.fake_quantize(jnp.zeros((16, 32)), (16, 16))))


@pytest.mark.parametrize("power", [-60, -20, 0, 20, 60])
def test_scale_extremes_are_exactly_scale_invariant(power):
    """Multiplying by a power of two moves only the global scale: the same codes and block scales."""
    w = jax.random.normal(jax.random.key(1), (4, 64))
    base = nvfp4.quantize(w)
    scaled = nvfp4.quantize(w * 2.0 ** power)
    np.testing.assert_array_equal(scaled[0], base[0])
    np.testing.assert_array_equal(np.asarray(scaled[1]).view(np.uint8), np.asarray(base[1]).view(np.uint8))
    np.testing.assert_allclose(scaled[2], base[2] * 2.0 ** power, rtol=1e-6)
    back = nvfp4.dequantize(*scaled)
    assert np.all(np.isfinite(back))


def test_dequantization_error_is_within_one_grid_step():
    w = jax.random.normal(jax.random.key(2), (2, 16, 128)) * jnp.exp(jax.random.normal(jax.random.key(3), (2, 16, 1)))
    packed, scale, gs = nvfp4.quantize(w)
    err = jnp.abs(nvfp4.dequantize(packed, scale, gs) - w).reshape(2, 16, 8, 16)
    unit = scale.astype(jnp.float32)[..., None] * gs[:, None, None, None]  # value of one E2M1 unit
    assert bool(jnp.all(err <= unit * 1.0 + 1e-7))  # half the widest gap (4 -> 6)


@pytest.mark.parametrize("bad,match", [(np.ones((4, 24)), "multiple of 16"), (np.ones(16), "multiple of 16"),
                                       (np.full((2, 16), np.nan), "NaN or Inf"),
                                       (np.array([[np.inf] + [0.0] * 15]), "NaN or Inf"),
                                       (np.ones((2, 16), np.int32), "floating")])
def test_nvfp4_rejects_bad_tensors(bad, match):
    with pytest.raises(QuantizationError, match=match):
        nvfp4.quantize(jnp.asarray(bad), name="layer.weight")


def test_dequantize_rejects_disagreeing_tensors():
    packed, scale, gs = nvfp4.quantize(jnp.ones((4, 32)))
    with pytest.raises(QuantizationError, match="disagree"):
        nvfp4.dequantize(packed, scale[:, :1], gs)


def test_stochastic_rounding_is_unbiased():
    values = jnp.array([0.3, 1.2, 2.6, 4.9, -3.7, 0.05, 5.99])
    x = jnp.broadcast_to(values, (40000, values.size))
    sr = nvfp4.e2m1_value(nvfp4.round_to_e2m1(x, jax.random.key(0)))
    mean = jnp.mean(sr, axis=0)
    # The standard error of a mean of 40,000 draws spanning a grid gap of at most 2 is below 0.005.
    np.testing.assert_allclose(mean, values, atol=0.02)
    rne = nvfp4.e2m1_value(nvfp4.round_to_e2m1(values))
    assert float(jnp.max(jnp.abs(rne - values))) > 0.2  # round-to-nearest is biased on these values
    # Every stochastic result is one of the two neighbours.
    assert bool(jnp.all(jnp.abs(sr - values) <= jnp.array([0.5, 0.5, 1, 2, 1, 0.5, 2]) + 1e-6))


def test_fake_quantize_1x16_equals_storage_roundtrip_and_2d_blocks_commute_with_transpose():
    w = jax.random.normal(jax.random.key(4), (32, 48))
    np.testing.assert_array_equal(nvfp4.fake_quantize(w), nvfp4.dequantize(*nvfp4.quantize(w)))
    q = nvfp4.fake_quantize(w, (16, 16))
    np.testing.assert_array_equal(q.T, nvfp4.fake_quantize(w.T, (16, 16)))
    # One scale per 16x16 tile: the tile's largest magnitude is representable at its block scale's top.
    tile = np.asarray(q[:16, 16:32])
    assert np.max(np.abs(tile)) == pytest.approx(np.max(np.abs(np.asarray(w[:16, 16:32]))), rel=0.07)


def test_fp8_per_tensor_and_per_channel_equal_ml_dtypes():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((6, 40)) * np.array([1e-3, 1, 10, 100, 1, 2])[:, None]).astype(np.float32)
    q, scale = fp8.quantize(jnp.asarray(w))
    want_scale = np.float32(np.max(np.abs(w)) / np.float32(448))
    assert q.dtype == jnp.float8_e4m3fn and scale.shape == () and float(scale) == want_scale
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), (w / want_scale).astype(F8).view(np.uint8))
    qc, sc = fp8.quantize(jnp.asarray(w), channel_axis=0)
    want_sc = (np.max(np.abs(w), axis=1) / np.float32(448)).astype(np.float32)
    np.testing.assert_array_equal(sc, want_sc)
    np.testing.assert_array_equal(np.asarray(qc).view(np.uint8), (w / want_sc[:, None]).astype(F8).view(np.uint8))
    back = fp8.dequantize(qc, sc, channel_axis=0)
    np.testing.assert_allclose(back, w, rtol=2 ** -4, atol=0)  # E4M3 keeps 3 mantissa bits


def test_fp8_zero_tensor_and_bad_inputs():
    q, scale = fp8.quantize(jnp.zeros((3, 4)))
    assert float(scale) == 0 and np.all(np.asarray(fp8.dequantize(q, scale)) == 0)
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        fp8.quantize(jnp.array([1.0, jnp.nan]), name="x")
    with pytest.raises(QuantizationError, match="scale shape"):
        fp8.dequantize(q, jnp.ones(3), channel_axis=1)
