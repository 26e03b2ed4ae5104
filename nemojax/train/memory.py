"""A lower bound on what a training run must hold in memory, checked before anything is allocated, so that
an impossible size (a hidden size of a million, a batch of a billion tokens) is refused by name instead of
exhausting the machine. Only what certainly exists at once is counted (the parameters, AdamW's two
moments, the gradients when they are clipped by their global norm, one micro-batch's hidden states and
the float32 logits of one loss chunk, `nemojax.train.losses.chunked_xent_sum`), against the accelerators'
memory, or for CPU devices the host memory available now; `nemojax.plan` gives the full per-device plan."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from nemojax.config import ModelConfig
from nemojax.errors import ConfigError
from nemojax.train.losses import LOSS_CHUNK_TOKENS, loss_chunk_positions


def capacity_bytes() -> int | None:
    """Memory of all devices together: the accelerators' limits, or for CPU devices the memory the hosts
    have available (None when unknown)."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except (AttributeError, NotImplementedError, RuntimeError):
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) * jax.device_count()
    if device.platform == "cpu":
        return _host_available_bytes() * jax.process_count()
    return None


def _host_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def lower_bound_bytes(config: ModelConfig, cfg: ml_collections.ConfigDict) -> dict[str, int]:
    """What a run needs at least, by part (bytes over all devices)."""
    from nemojax.planning.counts import count_parameters

    params = count_parameters(config).total
    copies = 4 if cfg.optimizer.grad_clip_norm > 0 else 3  # clipping needs every gradient before any update
    rows = int(cfg.batch_size) // int(cfg.grad_accum_steps)
    chunk_tokens = rows * loss_chunk_positions(rows, int(cfg.seq_len), int(cfg.get("loss_chunk_tokens",
                                                                                     LOSS_CHUNK_TOKENS)))
    micro_tokens = rows * int(cfg.seq_len)
    return {"parameters, gradients and AdamW moments": copies * params * np.dtype(config.param_dtype).itemsize,
            "hidden states of one micro-batch": micro_tokens * config.hidden_size
            * np.dtype(config.compute_dtype).itemsize,
            "float32 logits of one loss chunk": chunk_tokens * config.vocab_size * 4}


def check_training_fits(config: ModelConfig, cfg: ml_collections.ConfigDict) -> None:
    """ConfigError when the lower bound exceeds the memory of every device together."""
    capacity = capacity_bytes()
    if capacity is None:
        return
    parts = lower_bound_bytes(config, cfg)
    if sum(parts.values()) > capacity:
        listed = ", ".join(f"{name} {size / 1e9:,.1f} GB" for name, size in parts.items())
        raise ConfigError(f"this run needs at least {sum(parts.values()) / 1e9:,.1f} GB ({listed}) but the "
                          f"{jax.device_count()} devices have {capacity / 1e9:,.1f} GB together; reduce the model "
                          "(hidden_size, vocab_size, layers, experts), batch_size or seq_len")
