"""The NVFP4 training recipe: Hadamard orthogonality, the three GEMMs' quantisation, unbiased gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.quant import nvfp4, training


def test_hadamard_is_orthogonal_and_random_signs_keep_it_so():
    h = training.hadamard_matrix(16)
    assert set(np.unique(np.abs(h))) == {0.25}
    np.testing.assert_allclose(h @ h.T, np.eye(16), atol=1e-6)
    r1, r2 = training.random_hadamard(jax.random.key(0)), training.random_hadamard(jax.random.key(1))
    np.testing.assert_allclose(r1 @ r1.T, np.eye(16), atol=1e-6)
    np.testing.assert_allclose(r1.T @ r1, np.eye(16), atol=1e-6)
    assert not np.allclose(r1, r2)
    with pytest.raises(ValueError, match="power of two"):
        training.hadamard_matrix(12)


def test_token_hadamard_leaves_the_weight_gradient_unchanged():
    """(H x).T (H dy) == x.T dy, also with a token count that needs padding."""
    x, dy = jax.random.normal(jax.random.key(0), (37, 32)), jax.random.normal(jax.random.key(1), (37, 48))
    h = training.random_hadamard(jax.random.key(2))
    got = training._token_hadamard(x, h).T @ training._token_hadamard(dy, h)
    np.testing.assert_allclose(got, x.T @ dy, rtol=1e-4, atol=1e-4)


def _inputs(t=40, k=48, n=32):
    x = jax.random.normal(jax.random.key(10), (2, t // 2, k))
    w = jax.random.normal(jax.random.key(11), (k, n)) * 0.1
    return x, w


def test_forward_is_quantized_activations_times_2d_quantized_weight():
    x, w = _inputs()
    y = jax.jit(training.nvfp4_train_matmul)(x, w, jax.random.key(0))
    want = nvfp4.fake_quantize(x.reshape(-1, 48)) @ nvfp4.fake_quantize(w, (16, 16))
    np.testing.assert_allclose(y.reshape(-1, 32), want, rtol=1e-5, atol=1e-5)
    # Round-to-nearest in the forward pass: the key does not change it.
    np.testing.assert_array_equal(y, training.nvfp4_train_matmul(x, w, jax.random.key(1)))
    exact = x.reshape(-1, 48) @ w
    rel = float(jnp.linalg.norm(y.reshape(-1, 32) - exact) / jnp.linalg.norm(exact))
    assert 0.01 < rel < 0.2  # quantised (not exact), but close


def test_gradients_are_close_to_exact_and_stochastic():
    x, w = _inputs()
    dy = jax.random.normal(jax.random.key(3), (2, 20, 32))

    def grads(key):
        _, vjp = jax.vjp(lambda a, b: training.nvfp4_train_matmul(a, b, key), x, w)
        return vjp(dy)

    dx, dw = jax.jit(grads)(jax.random.key(0))
    assert dx.shape == x.shape and dw.shape == w.shape
    exact_dx, exact_dw = dy @ w.T, x.reshape(-1, 48).T @ dy.reshape(-1, 32)
    for got, exact in ((dx, exact_dx), (dw, exact_dw)):
        rel = float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact))
        assert 0.01 < rel < 0.3
    dx2, dw2 = jax.jit(grads)(jax.random.key(1))
    assert not np.allclose(dx, dx2) and not np.allclose(dw, dw2)


def test_dgrad_is_unbiased_over_the_rounding():
    """E[Qsr(dy)] = dy, so the mean dgrad over keys tends to dy @ Q2d(w).T, not to a biased value."""
    _, w = _inputs()
    dy = jax.random.normal(jax.random.key(4), (16, 32))
    wq = nvfp4.fake_quantize(w, (16, 16))
    keys = jax.random.split(jax.random.key(5), 512)
    samples = jax.jit(jax.vmap(lambda k: training.dgrad(dy, w, k)))(keys)
    target = dy @ wq.T
    one = float(jnp.linalg.norm(samples[0] - target))
    mean = float(jnp.linalg.norm(jnp.mean(samples, axis=0) - target))
    assert mean < one / 10  # ~1/sqrt(512) of one draw's error if unbiased


def test_weight_blocks_are_shared_between_forward_and_backward():
    """dgrad with a gradient that quantises exactly (one nonzero value per row) reads Q2d(w).T exactly."""
    _, w = _inputs()
    dy = jnp.zeros((16, 32)).at[jnp.arange(16), jnp.arange(16)].set(1.0)
    dx = training.dgrad(dy, w, jax.random.key(0))
    np.testing.assert_allclose(dx, nvfp4.fake_quantize(w, (16, 16)).T[:16], rtol=1e-6)


def test_the_recipe_trains_through_jit_and_grad():
    x, w = _inputs()
    target = jax.random.normal(jax.random.key(6), (2, 20, 32))

    def loss(w, key):
        return jnp.mean((training.nvfp4_train_matmul(x, w, key) - target) ** 2)

    step = jax.jit(lambda w, key: w - 0.5 * jax.grad(loss)(w, key))
    start = float(loss(w, jax.random.key(0)))
    for i in range(20):
        w = step(w, jax.random.key(i))
    assert float(loss(w, jax.random.key(0))) < 0.9 * start


def test_grouped_recipe_forward_and_gradients():
    sizes = jnp.array([7, 0, 21, 4], jnp.int32)
    m, k, n = 35, 32, 48  # three trailing rows past the groups
    x = jax.random.normal(jax.random.key(20), (m, k))
    w = jax.random.normal(jax.random.key(21), (4, k, n)) * jnp.array([0.1, 1.0, 0.5, 2.0])[:, None, None]
    dy = jax.random.normal(jax.random.key(22), (m, n))
    y, vjp = jax.jit(lambda a, b: jax.vjp(lambda p, q: training.nvfp4_train_grouped_matmul(
        p, q, sizes, jax.random.key(0)), a, b))(x, w)
    dx, dw = vjp(dy)
    # Forward: Q(x) (one global scale over the rows) times each expert's 16x16-quantised weight.
    xq = nvfp4.fake_quantize(x)
    starts = np.cumsum([0, 7, 0, 21])
    for e, (start, size) in enumerate(zip(starts, [7, 0, 21, 4], strict=True)):
        rows = slice(start, start + size)
        np.testing.assert_allclose(y[rows], xq[rows] @ nvfp4.fake_quantize(w[e], (16, 16)), rtol=1e-5, atol=1e-5)
        exact_dw = x[rows].T @ dy[rows]
        if size == 0:
            np.testing.assert_array_equal(dw[e], 0)
        else:
            rel = float(jnp.linalg.norm(dw[e] - exact_dw) / jnp.linalg.norm(exact_dw))
            assert rel < 0.3, (e, rel)
    np.testing.assert_array_equal(y[32:], 0)
    pieces = zip(starts, [7, 0, 21, 4], strict=True)
    exact_dx = jnp.concatenate([dy[s:s + z] @ w[e].T for e, (s, z) in enumerate(pieces)])
    rel = float(jnp.linalg.norm(dx[:32] - exact_dx) / jnp.linalg.norm(exact_dx))
    assert 0.01 < rel < 0.3
    np.testing.assert_array_equal(dx[32:], 0)
