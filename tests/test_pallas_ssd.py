"""Pallas SSD kernels (pallas_kernels/ssd.py) against the pure-JAX reference and the sequential scan.

On CPU the Mosaic GPU kernels run in JAX's GPU interpreter (slow: shapes stay tiny); every kernel
is also lowered for CUDA, which runs the whole Mosaic GPU compiler front end without a GPU and
checks, among others, that the kernels fit in Hopper's shared memory at the model's tile sizes.
The kernels' matmul operands are bfloat16 (for float32 inputs too), hence the 2 % tolerance,
relative to the largest reference value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.ops import ssd as reference
from pallas_kernels import ssd as kernels

TOLERANCE = 2e-2


def _inputs(b, t, h, p, g, n, dtype, with_state, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (b, t, h, p)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, t, h)) - 1.0)
    a = -jnp.exp(0.5 * jax.random.normal(ks[2], (h,)))
    bm = jax.random.normal(ks[3], (b, t, g, n)).astype(dtype)
    cm = jax.random.normal(ks[4], (b, t, g, n)).astype(dtype)
    state = jax.random.normal(ks[5], (b, h, p, n)) if with_state else None
    return x, dt, a, bm, cm, state


def _assert_close(actual, expected, name):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, name
    error = np.max(np.abs(actual - expected))
    scale = np.max(np.abs(expected))
    assert error <= TOLERANCE * scale, f"{name}: max error {error:.3g} vs max value {scale:.3g}"


@pytest.mark.parametrize("b,t,h,p,g,n,dtype,with_state", [
    (1, 70, 2, 5, 1, 3, jnp.float32, True),     # t not a multiple of the chunk, odd sizes, g = 1
    (2, 64, 4, 8, 2, 16, jnp.bfloat16, False),  # g > 1, bfloat16, no initial state
])
def test_chunked_scan_matches_reference_and_sequential(b, t, h, p, g, n, dtype, with_state):
    x, dt, a, bm, cm, state = _inputs(b, t, h, p, g, n, dtype, with_state)
    y, final = jax.jit(lambda *args: kernels.chunked_scan(*args[:5], chunk_size=32, initial_state=args[5],
                                                          interpret=True))(x, dt, a, bm, cm, state)
    y_ref, final_ref = reference.ssd_chunked(x, dt, a, bm, cm, 32, state)
    y_seq, final_seq = reference.ssd_sequential(x, dt, a, bm, cm, state)
    assert y.dtype == jnp.float32 and final.dtype == jnp.float32
    _assert_close(y, y_ref, "y vs ssd_chunked")
    _assert_close(final, final_ref, "final state vs ssd_chunked")
    _assert_close(y, y_seq, "y vs ssd_sequential")
    _assert_close(final, final_seq, "final state vs ssd_sequential")


@pytest.mark.parametrize("b,t,h,p,g,n,dtype,with_state", [
    (1, 100, 4, 6, 2, 5, jnp.float32, True),
    (1, 70, 2, 8, 1, 4, jnp.bfloat16, False),
])
def test_chunked_scan_gradients_match_reference(b, t, h, p, g, n, dtype, with_state):
    x, dt, a, bm, cm, state = _inputs(b, t, h, p, g, n, dtype, with_state, seed=1)
    if state is None:
        state = jnp.zeros((b, h, p, n), jnp.float32)
    ky, ks = jax.random.split(jax.random.key(2))
    y_weight = jax.random.normal(ky, x.shape)
    state_weight = jax.random.normal(ks, state.shape)

    def loss(scan):
        def f(*args):
            y, final = scan(*args)
            return jnp.sum(y * y_weight) + jnp.sum(final * state_weight)
        return f

    kernel_loss = loss(lambda *args: kernels.chunked_scan(*args[:5], chunk_size=64, initial_state=args[5],
                                                          interpret=True))
    reference_loss = loss(lambda *args: reference.ssd_chunked(*args[:5], 64, args[5]))
    args = (x, dt, a, bm, cm, state)
    grads = jax.jit(jax.grad(kernel_loss, argnums=range(6)))(*args)
    grads_ref = jax.grad(reference_loss, argnums=range(6))(*args)
    names = ("x", "dt", "A", "B", "C", "initial_state")
    for name, grad, grad_ref, arg in zip(names, grads, grads_ref, args, strict=True):
        assert grad.dtype == arg.dtype, name
        _assert_close(grad, grad_ref, f"d{name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_update_matches_reference(dtype):
    b, h, p, g, n = 2, 4, 5, 2, 3
    ks = jax.random.split(jax.random.key(3), 6)
    state = jax.random.normal(ks[0], (b, h, p, n))
    x = jax.random.normal(ks[1], (b, h, p)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[2], (b, h)))
    a = -jnp.exp(jax.random.normal(ks[3], (h,)))
    bv, cv = (jax.random.normal(k, (b, g, n)).astype(dtype) for k in ks[4:])
    y, new_state = jax.jit(lambda *args: kernels.state_update(*args, interpret=True))(state, x, dt, a, bv, cv)
    y_ref, state_ref = reference.ssd_step(state, x, dt, a, bv, cv)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new_state, state_ref, rtol=1e-5, atol=1e-5)


def _lowers_for_cuda(fn, *args) -> bool:
    return "mosaic_gpu" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_kernels_lower_for_cuda_at_model_tile_sizes():
    """Head dim 64, state 128 (Nano/Super/Ultra): forward, backward (through jax.grad) and the state update."""
    x, dt, a, bm, cm, state = _inputs(1, 128, 2, 64, 1, 128, jnp.bfloat16, True)
    scan = lambda *args: kernels.chunked_scan(*args[:5], chunk_size=128, initial_state=args[5])
    assert _lowers_for_cuda(scan, x, dt, a, bm, cm, state)
    assert _lowers_for_cuda(jax.grad(lambda *args: jnp.sum(scan(*args)[0]), argnums=range(6)),
                            x, dt, a, bm, cm, state)
    assert _lowers_for_cuda(kernels.state_update, state, x[:, 0], dt[:, 0], a, bm[:, 0], cm[:, 0])


def test_mismatched_shapes_name_the_argument():
    x, dt, a, bm, cm, _ = _inputs(1, 8, 4, 8, 2, 8, jnp.float32, False)
    with pytest.raises(ValueError, match="`dt`"):
        kernels.chunked_scan(x, dt[:, :4], a, bm, cm, chunk_size=8)
    with pytest.raises(ValueError, match="groups"):
        kernels.chunked_scan(x[:, :, :3], dt[:, :, :3], a[:3], bm, cm, chunk_size=8)
