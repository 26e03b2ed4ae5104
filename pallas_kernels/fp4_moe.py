"""Grouped expert matmul with NVFP4 weights (W4A16) for NVIDIA Hopper, as a Pallas Mosaic GPU kernel.

    out[i] = x[i] @ dequant(W[e(i)])^T,   dequant(W)[n, k] = e2m1(code[n, k]) * block_scale[n, k // 16] * global_scale

with the ModelOpt layout: `packed` uint8 [E, N, K/2] (element 2j in the low nibble of byte j),
`block_scale` float8_e4m3fn [E, N, K/16], `global_scale` float32 [E]. Rows of x [M, K] are sorted by
expert, `group_sizes` [E] rows each (summing to at most M; rows past the sum come back zero).

Hopper has no FP4 tensor cores, so the weights are decoded in the kernel, tile by tile, into SMEM
and multiplied there: BF16 weights never reach HBM. Mosaic GPU refuses float4 -> bf16 casts before
Blackwell, so each E2M1 code is moved with integer bit operations into an E4M3 byte of the same
value times 2**-6, which the hardware converts. Two layout tricks keep every step a plain
elementwise operation on tiles of the same shape:

- The low and high nibbles of a byte hold elements 2j and 2j+1. Instead of interleaving them, the
  kernel decodes them into separate tiles and multiplies them with the even and odd columns of x
  (x's K axis is permuted outside the kernel, a pass over the small activations only).
- Each E4M3 block scale covers 8 bytes along a row; it is expanded to one scale per byte by a
  wgmma with a constant 0/1 matrix ([64, 16] scales x [16, 64] selection = [64, 64] per-byte
  scales, exact since each output is one product), which yields it in the register layout of the
  decoded tile.

Grid: (64-row blocks of N, token tiles). A token tile holds up to `tile_tokens` rows of ONE expert
(a schedule of (expert, first row, rows) per tile is computed outside; empty tiles exit at once),
so the expert's weights stream through the CTA once per tile: at decode batch sizes each active
expert is read once, the memory-bound minimum. Weights are the wgmma M side (64 rows), tokens the
N side (8 to 128), K streams through a two-stage TMA pipeline in steps of 256.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._mgpu import COMPILER_PARAMS, Regs, round_up, tile_transforms, tiled_smem
from pallas_kernels.interpret import interpret_params, run_interpreted

STEP_K = 256  # K per pipeline step: 128 packed bytes, 16 block scales (the 16-byte TMA minimum)
ROWS_N = 64  # weight rows per CTA (one wgmma M block)
_HALF = STEP_K // 4  # 64 packed bytes = one decoded [64, 64] tile per nibble
_MAX_GRID_Y = 65535  # token tiles are the grid's second dimension
_DECODE_SCALE = 64.0  # the decoded weights are E2M1 values times 2**-6 (see _e2m1_to_scaled_f32)


def _scale_selection() -> np.ndarray:
    """sel[h, b, j] = 1 if packed byte 64h + j of a step lies in 16-element block b."""
    sel = np.zeros((2, STEP_K // 16, _HALF), np.float32)
    for h in range(2):
        for j in range(_HALF):
            sel[h, (h * _HALF + j) // 8, j] = 1.0
    return sel


def _e2m1_to_scaled_f32(byte: jax.Array, nibble: int) -> jax.Array:
    """E2M1 codes in the low (0) or high (1) nibble of uint8 `byte`, as float32 values times 2**-6.

    The code's bits are moved into an E4M3 byte (sign to bit 7, the two exponent bits and the
    mantissa bit to the top of E4M3's exponent and mantissa fields): a bit-exact re-encoding of
    value * 2**-6, E2M1's subnormal 0.5 landing on an E4M3 subnormal. The hardware E4M3 -> f16 ->
    f32 conversions then do the rest (a few integer operations per element in all).
    """
    wide = byte.astype(jnp.uint16)  # Mosaic GPU shifts 16- and 32-bit values only
    if nibble == 0:
        bits = ((wide & 0x08) << 4) | ((wide & 0x07) << 2)
    else:
        bits = (wide & 0x80) | ((wide & 0x70) >> 2)
    e4m3 = lax.bitcast_convert_type(bits.astype(jnp.uint8), jnp.float8_e4m3fn)
    return e4m3.astype(jnp.float16).astype(jnp.float32)


def _tile_schedule(group_sizes: jax.Array, num_tiles: int, tile_tokens: int):
    """Per token tile: (expert, first row, rows); and per row: (tile, position in the tile)."""
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    tiles = -(-sizes // tile_tokens)
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(tile_end, tile, side="right"), sizes.shape[0] - 1).astype(jnp.int32)
    local = tile - tile_start[group]
    first_row = starts[group] + local * tile_tokens
    rows = jnp.where(tile < tile_end[-1], jnp.clip(sizes[group] - local * tile_tokens, 0, tile_tokens), 0)
    schedule = jnp.stack([group, first_row, rows])
    return schedule, starts, tile_start


def _row_positions(m: int, sizes, starts, tile_start, tile_tokens: int):
    row = jnp.arange(m, dtype=jnp.int32)
    ends = starts + sizes
    group = jnp.minimum(jnp.searchsorted(ends, row, side="right"), sizes.shape[0] - 1)
    local = row - starts[group]
    return tile_start[group] + local // tile_tokens, local % tile_tokens, row < ends[-1]


def _default_tile_tokens(m: int, num_experts: int) -> int:
    """Tokens per tile: about twice the mean rows of a non-empty expert, between 16 and 128.

    (16: the output tile's rows must span at least 32 bytes for a swizzled SMEM layout.)
    """
    mean_rows = -(-m // max(1, min(num_experts, m)))
    tile = 16
    while tile < 128 and tile < 2 * mean_rows:
        tile *= 2
    return tile


def _kernel_call(x_perm, packed_q, scales, global_scale, selection, schedule, *, n_pad, tile_tokens, interpret):
    """x_perm [4, M + T, K/4]; packed_q [E, N, K/128, 64] u8; scales [E, N, K/16] f8 -> out [tiles, N, T]."""
    num_tiles = schedule.shape[1]
    k_steps = packed_q.shape[2] // 2
    dtype = x_perm.dtype
    out_dtype = dtype
    regs = Regs(interpret)
    T = tile_tokens

    def kernel(x_g, packed_g, scales_g, gscale_g, sel_g, sched_g, out_g,
               sel_smem, scale_smem, w_smem, out_smem, barrier):
        n_block = lax.axis_index("n")
        tile = lax.axis_index("tile")
        group = sched_g[0, tile]
        first_row = sched_g[1, tile]
        rows = sched_g[2, tile]

        @pl.when(rows > 0)
        def _():
            plgpu.copy_gmem_to_smem(sel_g, sel_smem, barrier)
            plgpu.barrier_wait(barrier)
            n_rows = pl.ds(n_block * ROWS_N, ROWS_N)

            def step(_, packed_lo_s, packed_hi_s, scale_s, x_s, acc):
                scale_smem[...] = regs.load(scale_s).astype(jnp.float32).astype(jnp.bfloat16)
                plgpu.commit_smem()
                for half, packed_s in enumerate((packed_lo_s, packed_hi_s)):
                    per_byte = regs.matmul(scale_smem, sel_smem.at[half])
                    byte = regs.load(packed_s)
                    for nibble in range(2):
                        value = _e2m1_to_scaled_f32(byte, nibble) * per_byte
                        w_smem.at[2 * half + nibble][...] = value.astype(dtype)
                plgpu.commit_smem()
                return acc + regs.matmul_sum([(w_smem.at[q], x_s.at[q]) for q in range(4)], b_t=True)

            acc0 = regs.cast(jnp.zeros((ROWS_N, T), jnp.float32), plgpu.Layout.WGMMA)
            packed_rows = packed_g.at[group, n_rows]
            acc = plgpu.emit_pipeline(
                step,
                grid=(k_steps,),
                in_specs=[
                    plgpu.BlockSpec((ROWS_N, None, _HALF), lambda k: (0, 2 * k, 0),
                                    transforms=tile_transforms(_HALF, jnp.uint8)),
                    plgpu.BlockSpec((ROWS_N, None, _HALF), lambda k: (0, 2 * k + 1, 0),
                                    transforms=tile_transforms(_HALF, jnp.uint8)),
                    plgpu.BlockSpec((ROWS_N, STEP_K // 16), lambda k: (0, k)),
                    plgpu.BlockSpec((4, T, _HALF), lambda k: (0, 0, k), transforms=tile_transforms(_HALF, dtype)),
                ],
                max_concurrent_steps=2,
                init_carry=acc0,
            )(packed_rows, packed_rows, scales_g.at[group, n_rows], x_g.at[:, pl.ds(first_row, T)])
            out_smem[...] = (acc * (_DECODE_SCALE * gscale_g[group])).astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, out_g.at[tile, n_rows])
            plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((num_tiles, n_pad, T), out_dtype),
        grid=(n_pad // ROWS_N, num_tiles),
        grid_names=("n", "tile"),
        scratch_types=[
            tiled_smem((2, STEP_K // 16, _HALF), jnp.bfloat16, swizzle=32),
            tiled_smem((ROWS_N, STEP_K // 16), jnp.bfloat16),
            tiled_smem((4, ROWS_N, _HALF), dtype), tiled_smem((ROWS_N, T), out_dtype), plgpu.Barrier(),
        ],
        compiler_params=COMPILER_PARAMS,
        interpret=interpret_params(interpret),
    )(x_perm, packed_q, scales, global_scale, selection, schedule)


def _permute_k(x: jax.Array) -> jax.Array:
    """[M, K] -> [4, M, K/4]: per 256-wide step, quarter q = (half h, nibble b) holds x[:, 2 (64 h + j) + b]."""
    m, k = x.shape
    steps = x.reshape(m, k // STEP_K, 2, _HALF, 2)  # [m, step, half, byte j, nibble]
    return jnp.transpose(steps, (2, 4, 0, 1, 3)).reshape(4, m, k // 4)


@functools.partial(jax.jit, static_argnames=("tile_tokens", "interpret"))
def grouped_matmul(
    x: jax.Array,
    packed: jax.Array,
    block_scale: jax.Array,
    global_scale: jax.Array,
    group_sizes: jax.Array,
    *,
    tile_tokens: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """x [M, K] (bf16, f16 or f32) times each row's expert's NVFP4 weight, transposed. Returns [M, N] in x.dtype."""
    m, k = x.shape
    num_experts, n, half_k = packed.shape
    if half_k * 2 != k or block_scale.shape != (num_experts, n, k // 16):
        raise ValueError(f"NVFP4 weights do not match x [{m}, {k}]: packed {packed.shape} (expected "
                         f"[E, N, {k // 2}]), block_scale {block_scale.shape} (expected [E, N, {k // 16}])")
    if k % 16:
        raise ValueError(f"K = {k} is not a multiple of the NVFP4 block size 16")
    tile = tile_tokens or _default_tile_tokens(m, num_experts)
    if tile % 16 or not 16 <= tile <= 256:
        raise ValueError(f"tile_tokens = {tile}: expected a multiple of 16 between 16 and 256")
    num_tiles = -(-m // tile) + min(num_experts, m)
    if num_tiles > _MAX_GRID_Y:
        raise ValueError(f"{m} rows in tiles of {tile} need {num_tiles} token tiles, more than a CUDA grid "
                         f"dimension holds ({_MAX_GRID_Y}): pass a larger tile_tokens")
    k_pad, n_pad = round_up(k, STEP_K), round_up(n, ROWS_N)
    x_perm = _permute_k(jnp.pad(x, [(0, tile), (0, k_pad - k)]))
    packed_q = jnp.pad(packed, [(0, 0), (0, n_pad - n), (0, (k_pad - k) // 2)]).reshape(
        num_experts, n_pad, k_pad // 128, _HALF)
    scales = jnp.pad(block_scale, [(0, 0), (0, n_pad - n), (0, (k_pad - k) // 16)])
    sizes = group_sizes.astype(jnp.int32)
    schedule, starts, tile_start = _tile_schedule(sizes, num_tiles, tile)
    out_tiles = run_interpreted(
        _kernel_call, x_perm, packed_q, scales, global_scale.astype(jnp.float32),
        jnp.asarray(_scale_selection(), jnp.bfloat16), schedule, n_pad=n_pad, tile_tokens=tile,
        interpret=interpret)
    tile_of_row, position, valid = _row_positions(m, sizes, starts, tile_start, tile)
    out = out_tiles[tile_of_row, :n, position]
    return jnp.where(valid[:, None], out, 0).astype(x.dtype)
