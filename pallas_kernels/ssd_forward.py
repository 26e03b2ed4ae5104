"""Forward chunked selective scan (Mamba-2 SSD) as one Mosaic GPU kernel.

One CTA (one warpgroup) owns one (batch row, head) and walks its chunks of `CHUNK` tokens in
order, the state [p, n] living in registers (float32) between chunks. Per chunk, with
cum = the within-chunk cumulative sum of dt * A (computed outside, it is tiny):

    CB   = C B^T                                            wgmma [L, n] x [n, L]
    P    = CB * exp(cum_i - cum_j) * dt_j   (j <= i)        registers, stored bf16 to SMEM
    y    = exp(cum_i) * (C S^T) + P x                       two wgmmas, written as float32
    S    = exp(cum_last) S + (x * w)^T B,  w_j = dt_j exp(cum_last - cum_j)

The inputs of the next chunks stream in through TMA (`emit_pipeline`, two stages) while one is
being computed. Matmul operands are bfloat16, accumulation and the state float32. The padded,
prepared inputs come from `pallas_kernels.ssd`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mgpu import COL, COMPILER_PARAMS, ROW, Regs, stream_out, tile_transforms, tiled_smem
from pallas_kernels.interpret import interpret_params

CHUNK = 64  # tokens per chunk walked by the kernel (a [64, 64] tile is one wgmma M block)
MMA_DTYPE = jnp.bfloat16
_F32 = jnp.float32


def forward_call(x, dt, cum, b_mat, c_mat, state0, *, save_states: bool, interpret: bool):
    """Runs the forward kernel on prepared inputs.

    x [b, t, h, p] bf16, dt and cum [b, h, t] f32, b_mat and c_mat [b, t, g, n] bf16,
    state0 [b, h, p, n] f32, with t a multiple of CHUNK and p, n multiples of 64.
    Returns y [b, t, h, p] f32, the final state [b, h, p, n] f32 and, with `save_states`, the
    state entering every chunk [b, h, t / CHUNK, p, n] bf16 (for the backward pass).
    """
    bsz, t, h, p = x.shape
    g, n = b_mat.shape[2], b_mat.shape[3]
    heads_per_group = h // g
    num_chunks = t // CHUNK
    L = CHUNK
    regs = Regs(interpret)

    def kernel(x_g, dt_g, cum_g, b_g, c_g, s0_g, y_g, final_g, *rest):
        states_g, saved_smem = (rest[0], rest[-1]) if save_states else (None, None)
        s_smem, p_smem, xw_smem, y_smem = rest[-5:-1] if save_states else rest[-4:]
        head = lax.axis_index("h")
        row = lax.axis_index("b")
        group = lax.div(head, jnp.int32(heads_per_group))
        state = regs.load_gmem(s0_g.at[row, head])

        def chunk(indices, x_s, dt_s, cum_s, b_s, c_s, state):
            (step,) = indices
            s_smem[...] = state.astype(MMA_DTYPE)
            cum_row, cum_col = regs.load(cum_s, ROW), regs.load(cum_s, COL)
            dt_col = regs.load(dt_s, COL)
            plgpu.commit_smem()

            cb = regs.matmul(c_s, b_s, b_t=True)
            lower = regs.iota((L, L), 0) >= regs.iota((L, L), 1)
            segment = regs.rows(cum_row, (L, L)) - regs.cols(cum_col, (L, L))
            p_mat = jnp.where(lower, cb * jnp.exp(segment) * regs.cols(dt_col, (L, L)), 0.0)
            p_smem[...] = p_mat.astype(MMA_DTYPE)
            plgpu.commit_smem()

            y = regs.matmul(c_s, s_smem, b_t=True) * regs.rows(jnp.exp(cum_row), (L, p))
            y = y + regs.matmul(p_smem, x_s)
            tiles = [(y, y_smem, y_g.at[row, pl.ds(step * L, L), head])]
            if save_states:
                tiles.append((state.astype(MMA_DTYPE), saved_smem, states_g.at[row, head, step]))
            stream_out(step, tiles)

            last = cum_s[L - 1]
            w = regs.load(dt_s, ROW) * jnp.exp(last - cum_row)
            xw_smem[...] = (regs.load(x_s).astype(_F32) * regs.rows(w, (L, p))).astype(MMA_DTYPE)
            plgpu.commit_smem()
            return state * jnp.exp(last) + regs.matmul(xw_smem, b_s, a_t=True)

        final = plgpu.emit_pipeline(
            chunk,
            grid=(num_chunks,),
            in_specs=[
                plgpu.BlockSpec((L, p), lambda c: (c, 0), transforms=tile_transforms(p, MMA_DTYPE)),
                plgpu.BlockSpec((L,), lambda c: (c,)),
                plgpu.BlockSpec((L,), lambda c: (c,)),
                plgpu.BlockSpec((L, n), lambda c: (c, 0), transforms=tile_transforms(n, MMA_DTYPE)),
                plgpu.BlockSpec((L, n), lambda c: (c, 0), transforms=tile_transforms(n, MMA_DTYPE)),
            ],
            max_concurrent_steps=2,
            init_carry=state,
        )(x_g.at[row, :, head], dt_g.at[row, head], cum_g.at[row, head], b_g.at[row, :, group],
          c_g.at[row, :, group])
        final_g.at[row, head][...] = final
        plgpu.wait_smem_to_gmem(0)

    out_type = [jax.ShapeDtypeStruct((bsz, t, h, p), _F32), jax.ShapeDtypeStruct((bsz, h, p, n), _F32)]
    if save_states:
        out_type.append(jax.ShapeDtypeStruct((bsz, h, num_chunks, p, n), MMA_DTYPE))
    scratch = [tiled_smem((p, n), MMA_DTYPE), tiled_smem((L, L), MMA_DTYPE), tiled_smem((L, p), MMA_DTYPE),
               tiled_smem((2, L, p), _F32)]
    if save_states:
        scratch.append(tiled_smem((2, p, n), MMA_DTYPE))
    outs = plgpu.kernel(
        kernel,
        out_type=tuple(out_type),
        grid=(h, bsz),
        grid_names=("h", "b"),
        scratch_types=scratch,
        compiler_params=COMPILER_PARAMS,
        interpret=interpret_params(interpret),
    )(x, dt, cum, b_mat, c_mat, state0)
    return tuple(outs) if save_states else (*outs, None)

