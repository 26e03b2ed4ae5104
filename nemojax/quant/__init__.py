"""Quantized numerics: NVFP4 and FP8 (storage and compute), and the NVFP4 training recipe."""
