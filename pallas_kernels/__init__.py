"""Pallas Mosaic GPU kernels for NVIDIA Hopper, each mirroring a pure-JAX op in `nemojax.ops`.

`ssd` (chunked selective scan with its backward, one-token state update) and `fp4_moe` (grouped
expert matmul with NVFP4 weights). The model reaches them through `nemojax.ops.dispatch`; see
docs/kernels.md for their design.
"""
