"""Small helpers shared by the Mosaic GPU kernels: SMEM tile layouts, register layouts, wgmma.

Register arrays in Mosaic GPU carry a layout (`WGMMA` for a [64k, n] tile spread over a
warpgroup, `ROW` / `COL` for a vector broadcast along a tile's rows / columns). The GPU
interpreter of jax 0.10/0.11 does not know `layout_cast` and refuses transposed wgmma operands;
`Regs` hides both: on a GPU (and under newer interpreters for transposes) it emits the real thing,
under the old interpreter it skips layout hints (they do not change values) and gives wgmma a
transposed copy of the operand. Everything else in a kernel is the same code on both.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per tile row
COL = plgpu.Layout.WGMMA.reduce(0)  # one value per tile column


def _interpreter_transposes() -> bool:
    """Whether the GPU interpreter accepts transposed refs (jax >= 0.12 does)."""
    try:
        from jax._src.pallas.mosaic.interpret import utils
    except ImportError:
        return False
    return hasattr(utils, "to_access")


INTERPRETER_TRANSPOSES = _interpreter_transposes()
_LOAD_TAKES_INDEX = "idx" in inspect.signature(plgpu.load).parameters

# Kernels here place registers in explicit layouts (Lane semantics). jax 0.12 made Warpgroup semantics
# (layouts inferred) the default, so the choice is pinned.
COMPILER_PARAMS = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tile_transforms(minor: int, dtype: jnp.dtype, swizzle: int | None = None) -> tuple:
    """Tiling + swizzle for an SMEM tile whose minor dimension holds `minor` elements (wgmma/TMA friendly).

    The swizzle defaults to the widest that divides a row; the two SMEM operands of a wgmma need equal ones.
    """
    itemsize = jnp.dtype(dtype).itemsize
    row_bytes = minor * itemsize
    swizzle = swizzle or next(s for s in (128, 64, 32) if row_bytes % s == 0)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def tiled_smem(shape: tuple[int, ...], dtype: jnp.dtype, swizzle: int | None = None) -> plgpu.SMEM:
    return plgpu.SMEM(shape, dtype, transforms=tile_transforms(shape[-1], dtype, swizzle))


@dataclasses.dataclass(frozen=True)
class Regs:
    """Register-level operations of one warpgroup, written once for the GPU and the interpreter."""

    interpret: bool

    def cast(self, value: jax.Array, layout) -> jax.Array:
        return value if self.interpret else plgpu.layout_cast(value, layout)

    def load(self, ref, layout=WGMMA) -> jax.Array:
        """ref[...] in the given register layout (the layout hint must directly follow the load)."""
        return self.cast(ref[...], layout)

    def load_gmem(self, ref, layout=WGMMA) -> jax.Array:
        """A GMEM tile straight into registers (unoptimised: for a once-per-CTA load, saves an SMEM stage)."""
        if self.interpret:
            return ref[...]
        index = ((),) if _LOAD_TAKES_INDEX else ()  # jax 0.12 dropped `plgpu.load`'s index argument
        return plgpu.load(ref, *index, layout=layout, optimized=False)

    def iota(self, shape: tuple[int, ...], dim: int) -> jax.Array:
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WGMMA)

    def matmul(self, a, b, *, a_t: bool = False, b_t: bool = False) -> jax.Array:
        """float32 (a or a^T) @ (b or b^T) of two SMEM tiles, through a fresh wgmma accumulator."""
        return self.matmul_sum([(a, b)], a_t=a_t, b_t=b_t)

    def matmul_sum(self, pairs, *, a_t: bool = False, b_t: bool = False) -> jax.Array:
        """The sum of several such products, issued back to back into one accumulator."""
        a, b = pairs[0]
        m = a.shape[1] if a_t else a.shape[0]
        n = b.shape[0] if b_t else b.shape[1]
        if self.interpret and not INTERPRETER_TRANSPOSES and (a_t or b_t):
            return sum(self._matmul_copying_transposes(a, b, a_t, b_t) for a, b in pairs)

        def scope(acc):
            for a, b in pairs:
                plgpu.wgmma(acc, a.T if a_t else a, b.T if b_t else b)
            return acc[...]

        return pl.run_scoped(scope, plgpu.ACC((m, n), jnp.float32))

    def _matmul_copying_transposes(self, a, b, a_t, b_t):
        a_shape = a.shape[::-1] if a_t else a.shape
        b_shape = b.shape[::-1] if b_t else b.shape

        def scope(a_copy, b_copy):
            a_copy[...] = a[...].T if a_t else a[...]
            b_copy[...] = b[...].T if b_t else b[...]
            return self.matmul(a_copy, b_copy)

        return pl.run_scoped(scope, plgpu.SMEM(a_shape, a.dtype), plgpu.SMEM(b_shape, b.dtype))

    def rows(self, vector: jax.Array, shape: tuple[int, int]) -> jax.Array:
        """A ROW vector broadcast along the columns of a [rows, cols] tile."""
        return lax.broadcast_in_dim(vector, shape, [0])

    def cols(self, vector: jax.Array, shape: tuple[int, int]) -> jax.Array:
        """A COL vector broadcast along the rows of a [rows, cols] tile."""
        return lax.broadcast_in_dim(vector, shape, [1])


def stream_out(step: jax.Array, tiles: list[tuple[jax.Array, object, object]]) -> None:
    """Writes this step's output tiles to GMEM through SMEM buffers, without waiting for the copies.

    `tiles` holds (value, smem [slots, *shape], gmem destination) triples, all with the same number
    of slots. Before a slot is overwritten, the copy issued from it `slots` steps ago must have read
    it; one commit group per step makes `wait_smem_to_gmem(slots - 1)` exactly that wait. With one
    slot the wait comes after this step's compute, by which time the last step's copy is long done.
    (`emit_pipeline` out_specs would do the same but use predicated copies, which the GPU
    interpreter does not support.)
    """
    slots = tiles[0][1].shape[0]
    slot = lax.rem(step, slots) if slots > 1 else 0
    plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
    for value, smem, _ in tiles:
        smem.at[slot][...] = value
    plgpu.commit_smem()
    for _, smem, gmem in tiles:
        plgpu.copy_smem_to_gmem(smem.at[slot], gmem, commit_group=False)
    plgpu.commit_smem_to_gmem_group()
