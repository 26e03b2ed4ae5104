"""Pure-JAX reference operations (the Pallas kernels in `pallas_kernels/` replace them on GPU)."""
