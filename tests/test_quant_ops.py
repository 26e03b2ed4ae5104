"""The quantized-weight ops against dequantise-then-matmul (numpy, float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.errors import QuantizationError
from nemojax.ops.grouped_matmul_nvfp4 import grouped_matmul_nvfp4
from nemojax.ops.quantized_matmul import fp8_matmul, grouped_fp8_matmul, nvfp4_matmul
from nemojax.quant import fp8, nvfp4


def _bank(key, e, n, k):
    w = jax.random.normal(key, (e, n, k)) * jnp.exp(jax.random.normal(jax.random.fold_in(key, 1), (e, 1, 1)))
    return nvfp4.quantize(w)


def _reference(x, packed, scale, gs, sizes):
    w = np.asarray(nvfp4.dequantize(packed, scale, gs), np.float64)
    x = np.asarray(x, np.float64)
    out = np.zeros((x.shape[0], w.shape[1]))
    start = 0
    for e, size in enumerate(sizes):
        out[start:start + size] = x[start:start + size] @ w[e].T
        start += size
    return out


@pytest.mark.parametrize("sizes,tile", [([5, 0, 3, 9], None), ([0, 0, 17, 0], 8), ([1, 1, 1, 1], None),
                                        ([40, 2, 0, 30], 16), ([0, 2, 0, 1, 0, 0], None)])
def test_grouped_nvfp4_equals_dequantize_then_matmul(sizes, tile):
    e, n, k = len(sizes), 24, 48
    packed, scale, gs = _bank(jax.random.key(len(sizes) + sum(sizes)), e, n, k)
    m = sum(sizes) + 3  # three trailing rows past the groups must come back zero
    x = jax.random.normal(jax.random.key(7), (m, k))
    fn = jax.jit(grouped_matmul_nvfp4, static_argnames="tile")
    out = fn(x, packed, scale, gs, jnp.array(sizes, jnp.int32), tile=tile)
    assert out.shape == (m, n) and out.dtype == x.dtype
    np.testing.assert_allclose(out, _reference(x, packed, scale, gs, sizes), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[sum(sizes):], 0)


def test_grouped_nvfp4_dequantizes_each_nonempty_expert_once(monkeypatch):
    import nemojax.ops.grouped_matmul_nvfp4 as op
    seen = []

    def counting(packed, scale, gs, dtype):
        jax.debug.callback(lambda: seen.append(1))
        return nvfp4.dequantize(packed, scale, gs, dtype)

    monkeypatch.setattr(op, "dequantize", counting)
    sizes = [9, 0, 20, 0, 1, 0]
    packed, scale, gs = _bank(jax.random.key(5), len(sizes), 16, 32)
    x = jax.random.normal(jax.random.key(6), (sum(sizes) + 5, 32))
    out = jax.jit(op.grouped_matmul_nvfp4, static_argnames="tile")(x, packed, scale, gs, jnp.array(sizes), tile=8)
    np.testing.assert_allclose(out, _reference(x, packed, scale, gs, sizes), rtol=1e-5, atol=1e-5)
    assert len(seen) == 3  # experts 0, 2 and 4; the empty ones and the unused tiles dequantise nothing


def test_grouped_nvfp4_in_bfloat16_and_under_jit():
    sizes = jnp.array([3, 0, 6], jnp.int32)
    packed, scale, gs = _bank(jax.random.key(3), 3, 16, 32)
    x = jax.random.normal(jax.random.key(4), (9, 32))
    fn = jax.jit(grouped_matmul_nvfp4)
    out = fn(x.astype(jnp.bfloat16), packed, scale, gs, sizes)
    assert out.dtype == jnp.bfloat16
    want = _reference(x, packed, scale, gs, [3, 0, 6])
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=3e-2, atol=3e-2 * np.abs(want).max())


def test_grouped_nvfp4_rejects_disagreeing_shapes():
    packed, scale, gs = _bank(jax.random.key(0), 2, 16, 32)
    with pytest.raises(QuantizationError, match="disagree"):
        grouped_matmul_nvfp4(jnp.ones((4, 16)), packed, scale, gs, jnp.array([2, 2]))


@pytest.mark.parametrize("channel", [False, True])
def test_fp8_matmul_equals_dequantize_then_matmul(channel):
    w_kn = jax.random.normal(jax.random.key(0), (32, 12)) * jnp.linspace(0.1, 10, 12)
    q, scale = fp8.quantize(w_kn, channel_axis=1 if channel else None)
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    want = np.asarray(x, np.float64) @ np.asarray(fp8.dequantize(q, scale, 1 if channel else None), np.float64)
    np.testing.assert_allclose(fp8_matmul(x, q, scale), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(QuantizationError, match="disagree"):
        fp8_matmul(x, q, jnp.ones(5))


def test_nvfp4_matmul_equals_dequantize_then_matmul():
    packed, scale, gs = nvfp4.quantize(jax.random.normal(jax.random.key(0), (12, 32)))
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    want = np.asarray(x, np.float64) @ np.asarray(nvfp4.dequantize(packed, scale, gs), np.float64).T
    np.testing.assert_allclose(jax.jit(nvfp4_matmul)(x, packed, scale, gs), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(QuantizationError, match="disagree"):
        nvfp4_matmul(x[..., :16], packed, scale, gs)


def test_grouped_fp8_equals_dequantize_then_matmul():
    sizes = [4, 0, 7]
    w = jax.random.normal(jax.random.key(2), (3, 32, 16)) * jnp.array([0.1, 1.0, 30.0])[:, None, None]
    q, scale = jax.vmap(lambda a: fp8.quantize(a))(w)
    x = jax.random.normal(jax.random.key(3), (sum(sizes) + 2, 32))
    deq = np.asarray(q.astype(jnp.float32), np.float64) * np.asarray(scale, np.float64)[:, None, None]
    want = np.zeros((x.shape[0], 16))
    start = 0
    for e, size in enumerate(sizes):
        want[start:start + size] = np.asarray(x[start:start + size], np.float64) @ deq[e]
        start += size
    out = jax.jit(grouped_fp8_matmul)(x, q, scale, jnp.array(sizes))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
