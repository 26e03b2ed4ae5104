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
import numpy as np

_F32 = jnp.float32


def _segment_sum(a_l: jax.Array) -> jax.Array:
    """seg[..., i, j] = sum_{j < k <= i} a[..., k] for i >= j, -inf above the diagonal.

    Summing masked copies (rather than subtracting cumulative sums) keeps it accurate when the
    cumulative decay is large. The masked sums are one matmul against a constant 0/1 tensor
    [i, j, k] (exact products, float32 sums): a cumulative sum on CPU is a windowed reduction that
    XLA fuses into, and recomputes for, every consumer element.
    """
    length = a_l.shape[-1]
    k = np.arange(length)
    pick_ijk = (k[None, None, :] <= k[:, None, None]) & (k[None, None, :] > k[None, :, None])
    seg = jnp.einsum("ijk,...k->...ij", jnp.asarray(pick_ijk, a_l.dtype), a_l, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(np.tril(np.ones((length, length), bool)), seg, -jnp.inf)


def _cumulative_sum(a_l: jax.Array) -> jax.Array:
    """Running sum over the last axis, as a matmul with a lower-triangular 0/1 matrix (see above)."""
    lower_ik = jnp.asarray(np.tril(np.ones((a_l.shape[-1],) * 2)), a_l.dtype)
    return jnp.einsum("ik,...k->...i", lower_ik, a_l, precision=jax.lax.Precision.HIGHEST)


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

    Inside a chunk the arrays are laid out head-major ([b, chunk, g, r, L, ...]) so that each of the
    scan's matmuls has its batch dimensions first and reads its operands without a transpose.
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
    x_bcgrlp = x.reshape(b, nc, L, g, r, p).transpose(0, 1, 3, 4, 2, 5)
    dt_bcgrl = dt.reshape(b, nc, L, g, r).transpose(0, 1, 3, 4, 2)
    bm_bcgln = bm.reshape(b, nc, L, g, n).transpose(0, 1, 3, 2, 4)
    cm_bcgln = cm.reshape(b, nc, L, g, n).transpose(0, 1, 3, 2, 4)

    a_bcgrl = dt_bcgrl * a_h.astype(_F32).reshape(g, r)[:, :, None]
    a_cum_bcgrl = _cumulative_sum(a_bcgrl)
    decay_bcgrls = jnp.exp(_segment_sum(a_bcgrl))
    to_end_bcgrl = jnp.exp(a_cum_bcgrl[..., -1:] - a_cum_bcgrl)
    chunk_decay_bcgr = jnp.exp(a_cum_bcgrl[..., -1])
    from_start_bcgrl = jnp.exp(a_cum_bcgrl)
    if doc_bt is not None:
        doc_bcl = jnp.pad(doc_bt, [(0, 0), (0, pad)], mode="edge").reshape(b, nc, L)
        end_bc = doc_bcl[:, :, -1]
        before_bc = jnp.concatenate([jnp.zeros_like(end_bc[:, :1]), end_bc[:, :-1]], axis=1)  # state entering
        heads = lambda keep: keep.astype(_F32)[:, :, None, None]  # [b, c, ...] -> [b, c, 1, 1, ...]
        decay_bcgrls = decay_bcgrls * heads(doc_bcl[:, :, :, None] == doc_bcl[:, :, None, :])
        to_end_bcgrl = to_end_bcgrl * heads(doc_bcl == end_bc[:, :, None])
        chunk_decay_bcgr = chunk_decay_bcgr * heads(end_bc == before_bc)
        from_start_bcgrl = from_start_bcgrl * heads(doc_bcl == before_bc[:, :, None])

    # Inside each chunk: y_i = sum_{j<=i} (C_i . B_j) exp(a_j+1..a_i) dt_j x_j.
    cb_bcgls = jnp.einsum("bcgln,bcgsn->bcgls", cm_bcgln, bm_bcgln)
    xdt_bcgrlp = x_bcgrlp * dt_bcgrl[..., None]
    y_diag = jnp.einsum("bcgrls,bcgrsp->bcgrlp", cb_bcgls[:, :, :, None] * decay_bcgrls, xdt_bcgrlp)

    # State contributed by each chunk alone, at the chunk's end.
    chunk_states = jnp.einsum("bcgln,bcgrlp->bcgrpn", bm_bcgln, xdt_bcgrlp * to_end_bcgrl[..., None])

    if initial_state_bhpn is None:
        state0 = jnp.zeros((b, g, r, p, n), _F32)
    else:
        state0 = initial_state_bhpn.astype(_F32).reshape(b, g, r, p, n)

    def carry_over(state, inputs):
        decay, new = inputs
        return state * decay[..., None, None] + new, state

    final, prev_states = jax.lax.scan(
        carry_over, state0, (jnp.moveaxis(chunk_decay_bcgr, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
    prev_states = jnp.moveaxis(prev_states, 0, 1)  # state entering each chunk [b,c,g,r,p,n]

    y_off = jnp.einsum("bcgln,bcgrpn->bcgrlp", cm_bcgln, prev_states) * from_start_bcgrl[..., None]
    y = (y_diag + y_off).transpose(0, 1, 4, 2, 3, 5).reshape(b, nc * L, h, p)[:, :t]
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
    bm, cm = b_bgn.astype(_F32), c_bgn.astype(_F32)
    xdt = x * dt[..., None]
    # y = new_state . C, expanded so that it reads the old state (no second pass over the new one).
    y = decay[..., None] * jnp.einsum("bgrpn,bgn->bgrp", state, cm) + xdt * jnp.sum(bm * cm, axis=-1)[:, :, None, None]
    state = state * decay[..., None, None] + xdt[..., None] * bm[:, :, None, None, :]
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
