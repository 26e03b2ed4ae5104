"""Backward chunked selective scan as one Mosaic GPU kernel (the VJP of `ssd_forward`).

One CTA per (batch row, head) walks the chunks in reverse, carrying dS = dLoss/d(state leaving
the chunk) [p, n] float32 in registers. It reads the state entering each chunk (S0, saved by the
forward kernel) and recomputes the chunk's intra-chunk matrices. With G = dy x^T,
D_ij = exp(cum_i - cum_j) (j <= i), P = C B^T * D * dt_j, dCB = G * D * dt_j, Q = G * (C B^T) * D,
w_j = dt_j exp(cum_last - cum_j):

    dx  = P^T dy + w_j (B dS^T)             dC = exp(cum_i) (dy S0) + dCB B
    dB  = dCB^T C + w_j (x dS)              dS0 = exp(cum_last) dS + (exp(cum_i) dy)^T C

and four per-position vectors from which `pallas_kernels.ssd` assembles the dt and A gradients
(a reverse cumulative sum inside each chunk, a few XLA ops on [b, h, t]):

    row_terms_i = sum_j Q_ij dt_j + sum_q dy_iq yoff_iq    (yoff = exp(cum_i) C S0^T)
    col_terms_j = sum_i Q_ij
    dw_j        = sum_n B_jn (x dS)_jn
    state_dot_q = sum_n dS_qn S0_qn

dB and dC come out per head (bfloat16) and are summed over the heads of a group outside.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mgpu import COL, COMPILER_PARAMS, ROW, Regs, stream_out, tile_transforms, tiled_smem
from pallas_kernels.interpret import interpret_params
from pallas_kernels.ssd_forward import CHUNK, MMA_DTYPE

_F32 = jnp.float32


def backward_call(x, dt, cum, b_mat, c_mat, states, dy, d_final, *, interpret: bool):
    """Runs the backward kernel on the forward's prepared inputs and saved states.

    dy [b, t, h, p] bf16 and d_final [b, h, p, n] f32 are the cotangents of y and the final state.
    Returns dx [b, t, h, p] bf16, dB and dC per head [b, t, h, n] bf16, d_initial [b, h, p, n] f32 and
    the vectors row_terms, col_terms, dw [b, h, t] and state_dot [b, h, t / CHUNK, p], all f32.
    """
    bsz, t, h, p = x.shape
    g, n = b_mat.shape[2], b_mat.shape[3]
    heads_per_group = h // g
    num_chunks = t // CHUNK
    L = CHUNK
    regs = Regs(interpret)

    def kernel(x_g, dt_g, cum_g, b_g, c_g, states_g, dy_g, dfinal_g,
               dx_g, db_g, dc_g, dinit_g, rowt_g, colt_g, dw_g, sdot_g,
               ds_smem, mat_smem, dye_smem, dx_out, db_out, dc_out, rowt_out, colt_out, dw_out, sdot_out):
        head = lax.axis_index("h")
        row = lax.axis_index("b")
        group = lax.div(head, jnp.int32(heads_per_group))
        d_state = regs.load_gmem(dfinal_g.at[row, head])

        def chunk(indices, x_s, dy_s, dt_s, cum_s, b_s, c_s, s0_s, d_state):
            (step,) = indices
            c_idx = num_chunks - 1 - step
            ds_smem[...] = d_state.astype(MMA_DTYPE)
            cum_row, cum_col = regs.load(cum_s, ROW), regs.load(cum_s, COL)
            dt_row, dt_col = regs.load(dt_s, ROW), regs.load(dt_s, COL)
            last = cum_s[L - 1]
            w = dt_row * jnp.exp(last - cum_row)
            e_row = jnp.exp(cum_row)
            dy = regs.load(dy_s).astype(_F32)
            dye_smem[...] = (dy * regs.rows(e_row, (L, p))).astype(MMA_DTYPE)
            plgpu.commit_smem()

            # Intra-chunk matrices.
            cb = regs.matmul(c_s, b_s, b_t=True)
            lower = regs.iota((L, L), 0) >= regs.iota((L, L), 1)
            decay = jnp.where(lower, jnp.exp(regs.rows(cum_row, (L, L)) - regs.cols(cum_col, (L, L))), 0.0)
            g_mat = regs.matmul(dy_s, x_s, b_t=True)
            q_mat = g_mat * cb * decay
            dt_cols = regs.cols(dt_col, (L, L))
            yoff = regs.matmul(c_s, s0_s, b_t=True) * regs.rows(e_row, (L, p))
            row_terms = (q_mat * dt_cols).sum(axis=1) + (dy * yoff).sum(axis=1)
            col_terms = q_mat.sum(axis=0)

            # dx = P^T dy + w (B dS^T)
            mat_smem[...] = (cb * decay * dt_cols).astype(MMA_DTYPE)
            plgpu.commit_smem()
            dx = regs.matmul(mat_smem, dy_s, a_t=True)
            dx = dx + regs.matmul(b_s, ds_smem, b_t=True) * regs.rows(w, (L, p))

            # dC = exp(cum) (dy S0) + dCB B;  dB = dCB^T C + w (x dS)
            mat_smem[...] = (g_mat * decay * dt_cols).astype(MMA_DTYPE)
            plgpu.commit_smem()
            dc = regs.matmul(dy_s, s0_s) * regs.rows(e_row, (L, n)) + regs.matmul(mat_smem, b_s)
            x_ds = regs.matmul(x_s, ds_smem)
            db = regs.matmul(mat_smem, c_s, a_t=True) + x_ds * regs.rows(w, (L, n))
            dw = (regs.load(b_s).astype(_F32) * x_ds).sum(axis=1)
            state_dot = (d_state * regs.load(s0_s).astype(_F32)).sum(axis=1)

            rows = pl.ds(c_idx * L, L)
            stream_out(step, [
                (dx.astype(MMA_DTYPE), dx_out, dx_g.at[row, rows, head]),
                (db.astype(MMA_DTYPE), db_out, db_g.at[row, rows, head]),
                (dc.astype(MMA_DTYPE), dc_out, dc_g.at[row, rows, head]),
                (row_terms, rowt_out, rowt_g.at[row, head, rows]),
                (col_terms, colt_out, colt_g.at[row, head, rows]),
                (dw, dw_out, dw_g.at[row, head, rows]),
                (state_dot, sdot_out, sdot_g.at[row, head, c_idx]),
            ])
            return d_state * jnp.exp(last) + regs.matmul(dye_smem, c_s, a_t=True)

        def reverse(c):
            return num_chunks - 1 - c

        tile = lambda minor: tile_transforms(minor, MMA_DTYPE)
        d_initial = plgpu.emit_pipeline(
            chunk,
            grid=(num_chunks,),
            in_specs=[
                plgpu.BlockSpec((L, p), lambda c: (reverse(c), 0), transforms=tile(p)),
                plgpu.BlockSpec((L, p), lambda c: (reverse(c), 0), transforms=tile(p)),
                plgpu.BlockSpec((L,), lambda c: (reverse(c),)),
                plgpu.BlockSpec((L,), lambda c: (reverse(c),)),
                plgpu.BlockSpec((L, n), lambda c: (reverse(c), 0), transforms=tile(n)),
                plgpu.BlockSpec((L, n), lambda c: (reverse(c), 0), transforms=tile(n)),
                plgpu.BlockSpec((None, p, n), lambda c: (reverse(c), 0, 0), transforms=tile(n)),
            ],
            max_concurrent_steps=2,
            init_carry=d_state,
        )(x_g.at[row, :, head], dy_g.at[row, :, head], dt_g.at[row, head], cum_g.at[row, head],
          b_g.at[row, :, group], c_g.at[row, :, group], states_g.at[row, head])
        dinit_g.at[row, head][...] = d_initial
        plgpu.wait_smem_to_gmem(0)

    out_type = (
        jax.ShapeDtypeStruct((bsz, t, h, p), MMA_DTYPE),
        jax.ShapeDtypeStruct((bsz, t, h, n), MMA_DTYPE),
        jax.ShapeDtypeStruct((bsz, t, h, n), MMA_DTYPE),
        jax.ShapeDtypeStruct((bsz, h, p, n), _F32),
        *(jax.ShapeDtypeStruct((bsz, h, t), _F32),) * 3,
        jax.ShapeDtypeStruct((bsz, h, num_chunks, p), _F32),
    )
    scratch = [
        tiled_smem((p, n), MMA_DTYPE), tiled_smem((L, L), MMA_DTYPE), tiled_smem((L, p), MMA_DTYPE),
        # Outputs, one slot each (see `stream_out`): two would not fit in SMEM with n = 128.
        tiled_smem((1, L, p), MMA_DTYPE), tiled_smem((1, L, n), MMA_DTYPE), tiled_smem((1, L, n), MMA_DTYPE),
        plgpu.SMEM((1, L), _F32), plgpu.SMEM((1, L), _F32), plgpu.SMEM((1, L), _F32), plgpu.SMEM((1, p), _F32),
    ]
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(h, bsz),
        grid_names=("h", "b"),
        scratch_types=scratch,
        compiler_params=COMPILER_PARAMS,
        interpret=interpret_params(interpret),
    )(x, dt, cum, b_mat, c_mat, states, dy, d_final)
