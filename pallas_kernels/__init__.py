"""Pallas GPU kernels (SSD scan, FP4 grouped expert matmul); each mirrors an op in `nemojax.ops`."""
