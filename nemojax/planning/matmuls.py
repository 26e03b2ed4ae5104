"""The grouped matmul the planner compiles the routed experts with, so that plans describe GPU code.

The planner compiles on CPU, where `nemojax.ops.grouped_matmul` takes its CPU path (tiles of rows
with one gathered copy of an expert weight per tile): its memory is not what a GPU allocates, so it
must not decide GPU verdicts. Choices (`--grouped-matmul`):

- `kernel` (default): a grouped GEMM that honours group sizes (the Pallas grouped kernel, XLA's
  cuDNN ragged-dot fusion): it allocates its output [m, n] and, in the backward, the input and
  weight gradients, nothing per group. Compiled through `grouped_gemm_shapes`, a stand-in with
  those buffers (its values are meaningless; plans never run it).
- `ragged-dot`: `jax.lax.ragged_dot`, which is what `grouped_matmul` calls on GPU. XLA lowers it
  with its generic ragged-dot expander unless a grouped-GEMM backend takes it (on NVIDIA GPUs, the
  cuDNN fusion behind `--xla_gpu_experimental_use_ragged_dot_fusion`, weight gradients only with a
  recent cuDNN): the operand is copied once per local expert, masked. The CPU compiler runs the same
  expander, so this compile measures that lowering.
- `cpu-tiled`: the CPU path itself (what runs in the tests), for CPU plans.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.ops.expert_banks import Matmul, expert_matmul

GROUPED_MATMUL_CHOICES = ("kernel", "ragged-dot", "cpu-tiled")


def grouped_gemm_shapes(x_mk: jax.Array, w_ekn: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
    """A memory stand-in for a grouped GEMM: one [m, k] x [k, n] product (the same FLOPs as the rows
    spread over their groups), float32 [m, n] out; its gradients are dx [m, k] and dw [E, k, n] (zero
    but for expert 0), the buffers a grouped GEMM's backward writes. Plans compile it, never run it."""
    del group_sizes_e
    return jnp.dot(x_mk, w_ekn[0].astype(x_mk.dtype), preferred_element_type=jnp.float32)


def ragged_dot_matmul(x_mk: jax.Array, w_ekn: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
    """`expert_matmul` with the GPU lowering (`jax.lax.ragged_dot`) on every platform."""
    return jax.lax.ragged_dot(x_mk, w_ekn.astype(x_mk.dtype), group_sizes_e.astype(jnp.int32),
                              preferred_element_type=jnp.float32)


def planning_matmul(choice: str) -> Matmul:
    """The grouped matmul of a `--grouped-matmul` choice."""
    return {"kernel": grouped_gemm_shapes, "ragged-dot": ragged_dot_matmul, "cpu-tiled": expert_matmul}[choice]
