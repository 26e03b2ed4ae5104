"""Mamba-2 selective state-space scan (SSD), pure-JAX reference.

The recurrence per head h, for time t:
    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t (outer) B_t
    y_t     = state_t @ C_t
`ssd_chunked` computes it in chunks (quadratic inside a chunk, a scan across chunks), exactly for
any length: the tail is padded with dt = 0, which leaves the state untouched. `ssd_step` is the
one-token update used when decoding. The Pallas kernels in `pallas_kernels/ssd.py` take the same
arguments (except `doc_bt`). All math is float32; the D skip and gating live in the mixer, not here.

Packed documents (`doc_bt`, int [b, t], numbers that only grow, see `nemojax.model.documents`): the
state restarts from zero wherever the number changes, i.e. at a start s, state_s = dt_s * x_s (outer)
B_s. Document 0 continues the initial state.

Shapes: b batch, t time, h heads, p head dim, g groups (B and C are shared by h/g heads), n state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _segment_sum(a_bclh: jax.Array) -> jax.Array:
    """seg[..., i, j, h] = sum_{j < k <= i} a[k] for i >= j, -inf above the diagonal.

    Summing masked copies (rather than subtracting cumulative sums) keeps it accurate when the
    cumulative decay is large.
    """
    length = a_bclh.shape[2]
    a_bclsh = jnp.broadcast_to(a_bclh[:, :, :, None, :], a_bclh.shape[:3] + (length,) + a_bclh.shape[3:])
    strict = jnp.tril(jnp.ones((length, length), bool), -1)[None, None, :, :, None]
    seg = jnp.cumsum(jnp.where(strict, a_bclsh, 0.0), axis=2)
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None, :, :, None]
    return jnp.where(causal, seg, -jnp.inf)


def ssd_chunked(
    x_bthp: jax.Array,
    dt_bth: jax.Array,
    a_h: jax.Array,
    b_btgn: jax.Array,
    c_btgn: jax.Array,
    chunk_size: int,
    initial_state_bhpn: jax.Array | None = None,
    doc_bt: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD scan. Returns (y [b,t,h,p] float32, final state [b,h,p,n] float32).

    With `doc_bt` every term that carries state from position j to position i is kept only when both
    are in the same document: inside a chunk, into a chunk's end state, and across chunks.
    """
    b, t, h, p = x_bthp.shape
    g, n = b_btgn.shape[2], b_btgn.shape[3]
    r = h // g
    chunk_size = min(chunk_size, t)  # any chunk size is exact; a short input needs no padding
    pad = (-t) % chunk_size
    x, dt, bm, cm = (jnp.pad(v.astype(_F32), [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
                     for v in (x_bthp, dt_bth, b_btgn, c_btgn))
    nc, L = (t + pad) // chunk_size, chunk_size
    x = x.reshape(b, nc, L, g, r, p)
    dt = dt.reshape(b, nc, L, h)
    bm = bm.reshape(b, nc, L, g, n)
    cm = cm.reshape(b, nc, L, g, n)

    a_bclh = dt * a_h.astype(_F32)
    a_cum_bclh = jnp.cumsum(a_bclh, axis=2)
    decay_bclsh = jnp.exp(_segment_sum(a_bclh)).reshape(b, nc, L, L, g, r)
    to_end_bclh = jnp.exp(a_cum_bclh[:, :, -1:, :] - a_cum_bclh).reshape(b, nc, L, g, r)
    chunk_decay_bch = jnp.exp(a_cum_bclh[:, :, -1, :]).reshape(b, nc, g, r)
    from_start = jnp.exp(a_cum_bclh).reshape(b, nc, L, g, r)
    if doc_bt is not None:
        doc_bcl = jnp.pad(doc_bt, [(0, 0), (0, pad)], mode="edge").reshape(b, nc, L)
        end_bc = doc_bcl[:, :, -1]
        before_bc = jnp.concatenate([jnp.zeros_like(end_bc[:, :1]), end_bc[:, :-1]], axis=1)  # state entering
        heads = lambda keep: keep.astype(_F32)[..., None, None]
        decay_bclsh = decay_bclsh * heads(doc_bcl[:, :, :, None] == doc_bcl[:, :, None, :])
        to_end_bclh = to_end_bclh * heads(doc_bcl == end_bc[:, :, None])
        chunk_decay_bch = chunk_decay_bch * heads(end_bc == before_bc)
        from_start = from_start * heads(doc_bcl == before_bc[:, :, None])

    # Inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(a_j+1..a_i) dt_j x_j.
    cb_bclsg = jnp.einsum("bclgn,bcsgn->bclsg", cm, bm)
    xdt = x * dt.reshape(b, nc, L, g, r)[..., None]
    y_diag = jnp.einsum("bclsg,bclsgr,bcsgrp->bclgrp", cb_bclsg, decay_bclsh, xdt)

    # State contributed by each chunk alone, at the chunk's end.
    chunk_states = jnp.einsum("bclgn,bclgr,bclgrp->bcgrpn", bm, to_end_bclh, xdt)

    if initial_state_bhpn is None:
        state0 = jnp.zeros((b, g, r, p, n), _F32)
    else:
        state0 = initial_state_bhpn.astype(_F32).reshape(b, g, r, p, n)

    def carry_over(state, inputs):
        decay, new = inputs
        return state * decay[..., None, None] + new, state

    final, prev_states = jax.lax.scan(
        carry_over, state0, (jnp.moveaxis(chunk_decay_bch, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
    prev_states = jnp.moveaxis(prev_states, 0, 1)  # state entering each chunk [b,c,g,r,p,n]

    y_off = jnp.einsum("bclgn,bcgrpn,bclgr->bclgrp", cm, prev_states, from_start)
    y = (y_diag + y_off).reshape(b, nc * L, h, p)[:, :t]
    return y, final.reshape(b, h, p, n)


def ssd_step(
    state_bhpn: jax.Array,
    x_bhp: jax.Array,
    dt_bh: jax.Array,
    a_h: jax.Array,
    b_bgn: jax.Array,
    c_bgn: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One-token state update for decoding. Returns (y [b,h,p], new state [b,h,p,n]), float32."""
    b, h, p, n = state_bhpn.shape
    g = b_bgn.shape[1]
    r = h // g
    dt = dt_bh.astype(_F32).reshape(b, g, r)
    decay = jnp.exp(dt * a_h.astype(_F32).reshape(g, r))
    x = x_bhp.astype(_F32).reshape(b, g, r, p)
    state = state_bhpn.astype(_F32).reshape(b, g, r, p, n)
    state = state * decay[..., None, None] + jnp.einsum(
        "bgr,bgrp,bgn->bgrpn", dt, x, b_bgn.astype(_F32))
    y = jnp.einsum("bgrpn,bgn->bgrp", state, c_bgn.astype(_F32))
    return y.reshape(b, h, p), state.reshape(b, h, p, n)


def ssd_sequential(
    x_bthp: jax.Array,
    dt_bth: jax.Array,
    a_h: jax.Array,
    b_btgn: jax.Array,
    c_btgn: jax.Array,
    initial_state_bhpn: jax.Array | None = None,
    all_states: bool = False,
    doc_bt: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The recurrence one step at a time (slow; the ground truth for tests and rollback).

    Returns (y [b,t,h,p], final state [b,h,p,n]); with `all_states`, the state after every
    position [b,t,h,p,n] instead of the final one (speculative decoding rolls back to any of them).
    With `doc_bt` the state is zeroed before each position whose document number changes.
    """
    b, t, h, p = x_bthp.shape
    n = b_btgn.shape[-1]
    state0 = jnp.zeros((b, h, p, n), _F32) if initial_state_bhpn is None else initial_state_bhpn
    doc_bt = jnp.zeros((b, t), jnp.int32) if doc_bt is None else doc_bt
    keep_bt = doc_bt == jnp.concatenate([jnp.zeros_like(doc_bt[:, :1]), doc_bt[:, :-1]], axis=1)

    def step(state, inputs):
        x, dt, bm, cm, keep = inputs
        state = state * keep.astype(_F32)[:, None, None, None]
        y, state = ssd_step(state, x, dt, a_h, bm, cm)
        return state, (y, state) if all_states else y

    final, out = jax.lax.scan(step, state0, tuple(jnp.moveaxis(v, 1, 0)
                                                  for v in (x_bthp, dt_bth, b_btgn, c_btgn, keep_bt)), unroll=t <= 8)
    if all_states:
        ys, states = out
        return jnp.moveaxis(ys, 0, 1), jnp.moveaxis(states, 0, 1)
    return jnp.moveaxis(out, 0, 1), final
