"""Mamba-2 selective scan (SSD) kernels for NVIDIA Hopper, written with Pallas Mosaic GPU.

`chunked_scan` mirrors `nemojax.ops.ssd.ssd_chunked` (forward kernel in `ssd_forward.py`, backward
kernel in `ssd_backward.py`, tied together with `jax.custom_vjp`); `state_update` mirrors
`nemojax.ops.ssd.ssd_step` (kernel in `ssd_step.py`). Shapes (b batch, t time, h heads, p head dim,
g groups, n state; head i reads group i // (h // g)):

    x [b, t, h, p], dt [b, t, h] (softplus'ed and clamped), A [h], B and C [b, t, g, n],
    initial / final state [b, h, p, n] float32, y [b, t, h, p] float32.

Any sizes work: inputs are padded here to the kernels' tiles (t to a multiple of the 64-token
chunk with dt = 0, which leaves the state untouched; p and n to multiples of 64 with zeros) and the
results sliced back. The kernels walk 64-token chunks whatever `chunk_size` is: the chunked
algorithm is exact for any chunk length, so only rounding differs from the reference's chunking.
Matmul operands are bfloat16 (also for float32 inputs), accumulation and states float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._mgpu import round_up
from pallas_kernels.interpret import run_interpreted
from pallas_kernels.ssd_backward import backward_call
from pallas_kernels.ssd_forward import CHUNK, MMA_DTYPE, forward_call
from pallas_kernels.ssd_step import state_update_call

_F32 = jnp.float32
_TILE = 64


def _pad(value: jax.Array, widths: dict[int, int]) -> jax.Array:
    pads = [(0, widths.get(axis, 0)) for axis in range(value.ndim)]
    return jnp.pad(value, pads) if any(w for _, w in pads) else value


def _prepare(x, dt, a, b_mat, c_mat):
    """Pads to the kernel tiles; dt and its within-chunk cumulative decay go head-major [b, h, t]."""
    bsz, t, h, p = x.shape
    n = b_mat.shape[-1]
    dt_pad, p_pad, n_pad = round_up(t, CHUNK) - t, round_up(p, _TILE) - p, round_up(n, _TILE) - n
    x_k = _pad(x.astype(MMA_DTYPE), {1: dt_pad, 3: p_pad})
    b_k = _pad(b_mat.astype(MMA_DTYPE), {1: dt_pad, 3: n_pad})
    c_k = _pad(c_mat.astype(MMA_DTYPE), {1: dt_pad, 3: n_pad})
    dt_k = jnp.moveaxis(_pad(dt.astype(_F32), {1: dt_pad}), 1, 2)
    steps = (dt_k * a.astype(_F32)[None, :, None]).reshape(bsz, h, -1, CHUNK)
    cum_k = jnp.cumsum(steps, axis=-1).reshape(dt_k.shape)
    return x_k, dt_k, cum_k, b_k, c_k


def _pad_state(state: jax.Array) -> jax.Array:
    p, n = state.shape[-2:]
    return _pad(state.astype(_F32), {2: round_up(p, _TILE) - p, 3: round_up(n, _TILE) - n})


def _scan_forward(x, dt, a, b_mat, c_mat, state0, interpret, save_states):
    t, p = x.shape[1], x.shape[3]
    n = b_mat.shape[-1]
    prepared = _prepare(x, dt, a, b_mat, c_mat)
    y, final, states = run_interpreted(forward_call, *prepared, _pad_state(state0), save_states=save_states,
                                       interpret=interpret)
    return (y[:, :t, :, :p], final[:, :, :p, :n]), states


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _scan(x, dt, a, b_mat, c_mat, state0, interpret):
    return _scan_forward(x, dt, a, b_mat, c_mat, state0, interpret, save_states=False)[0]


def _scan_fwd(x, dt, a, b_mat, c_mat, state0, interpret):
    outputs, states = _scan_forward(x, dt, a, b_mat, c_mat, state0, interpret, save_states=True)
    return outputs, (x, dt, a, b_mat, c_mat, states)


def _dt_and_a_grads(dt_k, cum_k, a, row_terms, col_terms, dw, state_dot):
    """dt and A gradients from the backward kernel's per-position vectors (see `ssd_backward`)."""
    bsz, h, t = dt_k.shape
    chunked = lambda v: v.reshape(bsz, h, t // CHUNK, CHUNK)
    dt_c, cum_c, row_c, col_c, dw_c = map(chunked, (dt_k, cum_k, row_terms, col_terms, dw))
    to_end = jnp.exp(cum_c[..., -1:] - cum_c)
    w = dt_c * to_end
    d_dt = col_c + dw_c * to_end
    d_cum = row_c - dt_c * col_c - dw_c * w
    at_end = jnp.sum(dw_c * w, axis=-1) + jnp.exp(cum_c[..., -1]) * jnp.sum(state_dot, axis=-1)
    d_cum = d_cum.at[..., -1].add(at_end)
    d_step = jnp.flip(jnp.cumsum(jnp.flip(d_cum, -1), axis=-1), -1)  # d(dt * A) at each position
    d_dt = d_dt + d_step * a.astype(_F32)[None, :, None, None]
    d_a = jnp.sum(d_step * dt_c, axis=(0, 2, 3))
    return d_dt.reshape(bsz, h, t), d_a


def _scan_bwd(interpret, residuals, cotangents):
    x, dt, a, b_mat, c_mat, states = residuals
    d_y, d_final = cotangents
    bsz, t, h, p = x.shape
    g, n = b_mat.shape[2], b_mat.shape[3]
    x_k, dt_k, cum_k, b_k, c_k = _prepare(x, dt, a, b_mat, c_mat)
    t_k, p_k = x_k.shape[1], x_k.shape[3]
    dy_k = _pad(d_y.astype(MMA_DTYPE), {1: t_k - t, 3: p_k - p})
    dx, db, dc, d_init, row_terms, col_terms, dw, state_dot = run_interpreted(
        backward_call, x_k, dt_k, cum_k, b_k, c_k, states, dy_k, _pad_state(d_final), interpret=interpret)
    d_dt, d_a = _dt_and_a_grads(dt_k, cum_k, a, row_terms, col_terms, dw, state_dot)

    def per_group(d_heads, like):
        summed = d_heads.astype(_F32).reshape(bsz, t_k, g, h // g, -1).sum(axis=3)
        return summed[:, :t, :, :n].astype(like.dtype)

    return (dx[:, :t, :, :p].astype(x.dtype), jnp.moveaxis(d_dt, 1, 2)[:, :t].astype(dt.dtype),
            d_a.astype(a.dtype), per_group(db, b_mat), per_group(dc, c_mat), d_init[:, :, :p, :n])


_scan.defvjp(_scan_fwd, _scan_bwd)


def chunked_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    *,
    chunk_size: int,
    initial_state: jax.Array | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD scan. Returns (y [b, t, h, p] float32, final state [b, h, p, n] float32).

    `interpret=True` runs the kernels in the Mosaic GPU interpreter (on CPU, for tests).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    bsz, t, h, p = x.shape
    g, n = B.shape[2:]
    _check_shapes(dict(x=x, dt=dt, A=A, B=B, C=C, initial_state=initial_state),
                  dict(x=(bsz, t, h, p), dt=(bsz, t, h), A=(h,), B=(bsz, t, g, n), C=(bsz, t, g, n),
                       initial_state=(bsz, h, p, n)), h, g)
    if initial_state is None:
        initial_state = jnp.zeros((bsz, h, p, n), _F32)
    return _scan(x, dt, A, B, C, initial_state, interpret)


def _check_shapes(arrays: dict, expected: dict, heads: int, groups: int) -> None:
    for name, value in arrays.items():
        if value is not None and tuple(value.shape) != expected[name]:
            raise ValueError(f"SSD kernel argument `{name}` has shape {tuple(value.shape)}, expected {expected[name]}")
    if heads % groups:
        raise ValueError(f"{groups} groups (B, C) do not divide {heads} heads (x)")



def state_update(
    state: jax.Array,
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One-token update: state [b, h, p, n], x [b, h, p], dt [b, h], A [h], B and C [b, g, n].

    Returns (y [b, h, p] float32, new state [b, h, p, n] float32), like `nemojax.ops.ssd.ssd_step`.
    """
    bsz, h, p, n = state.shape
    g = B.shape[1]
    _check_shapes(dict(state=state, x=x, dt=dt, A=A, B=B, C=C),
                  dict(state=(bsz, h, p, n), x=(bsz, h, p), dt=(bsz, h), A=(h,), B=(bsz, g, n), C=(bsz, g, n)), h, g)
    p_pad, n_pad = round_up(p, _TILE) - p, round_up(n, _TILE) - n
    dt32 = dt.astype(_F32)
    decay = jnp.broadcast_to(jnp.exp(dt32 * A.astype(_F32))[..., None], x.shape)
    xdt = x.astype(_F32) * dt32[..., None]
    y, new_state = run_interpreted(
        state_update_call, _pad_state(state), _pad(decay, {2: p_pad}), _pad(xdt, {2: p_pad}),
        _pad(B.astype(_F32), {2: n_pad}), _pad(C.astype(_F32), {2: n_pad}), interpret=interpret)
    return y[:, :, :p], new_state[:, :, :p, :n]
