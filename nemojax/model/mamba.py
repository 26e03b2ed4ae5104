"""Mamba-2 mixer: in_proj -> causal depthwise conv + SiLU -> selective scan (SSD) -> gated norm -> out_proj.

Padding is exact: at positions where `valid` is False the conv input is zero and dt is zero, so
the SSM state passes through unchanged (left-padded prompts start from a clean state), and the conv
state kept in the cache is the last kernel-1 inputs up to each row's last valid position (a row padded
on the right keeps its real inputs; see `filled_length`). Given document ids instead
(`nemojax.model.documents`), the conv and SSM states restart at each document.

Layout: the fused `in_proj` columns and the conv channels are stored group-major (for each of the
`n_groups` groups: its z, x, B, C, dt columns; its x, B, C channels), not in the published order
(all z, all x, all B, all C, all dt). Heads belong to groups contiguously, so a tensor-parallel shard
of whole groups holds everything its heads need and the mixer runs without communication up to
`out_proj`. `in_proj_order` / `conv_order` give the permutation the checkpoint table applies.

Cache (decoding): {"conv": [b, k-1, conv_dim] last conv inputs, "ssm": [b, h, p, n] float32}.
With `per_position_states` the returned cache holds the state after every position instead
({"conv": [b, t, k-1, conv_dim], "ssm": [b, t, h, p, n]}): speculative decoding keeps the one
of its last accepted token.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nemojax import sharding
from nemojax.config import ModelConfig
from nemojax.model import documents
from nemojax.model.layers import GatedGroupRMSNorm, Linear, default_init, dtype_of, filled_length
from nemojax.ops import dispatch, ssd

MambaCache = dict[str, jax.Array]


def init_mamba_cache(config: ModelConfig, batch: int, dtype: jnp.dtype) -> MambaCache:
    """Zero conv and SSM state for one Mamba layer."""
    return {
        "conv": jnp.zeros((batch, config.conv_kernel - 1, config.mamba_conv_dim), dtype),
        "ssm": jnp.zeros((batch, config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size),
                         jnp.float32),
    }


def _group_major(pieces: list[tuple[int, int]], groups: int) -> np.ndarray:
    """Published indices in group-major order; `pieces` are (offset, width per group) in published order."""
    return np.concatenate([offset + g * width + np.arange(width) for g in range(groups) for offset, width in pieces])


def in_proj_order(config: ModelConfig) -> np.ndarray:
    """order[j] = published in_proj output column stored at nemojax column j."""
    inner, g, n, h = config.mamba_inner, config.n_groups, config.ssm_state_size, config.mamba_num_heads
    z, x, b, c, dt = 0, inner, 2 * inner, 2 * inner + g * n, 2 * inner + 2 * g * n
    return _group_major([(z, inner // g), (x, inner // g), (b, n), (c, n), (dt, h // g)], g)


def conv_order(config: ModelConfig) -> np.ndarray:
    """order[j] = published conv1d channel stored at nemojax channel j."""
    inner, g, n = config.mamba_inner, config.n_groups, config.ssm_state_size
    return _group_major([(0, inner // g), (inner, n), (inner + g * n, n)], g)


def _dt_bias_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """softplus^-1 of dt drawn log-uniformly from [1e-3, 1e-1] (the Mamba-2 initialisation)."""
    log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(1e-3), math.log(1e-1))
    dt = jnp.maximum(jnp.exp(log_dt), 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _a_log_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    del key
    return jnp.log(jnp.arange(1, shape[0] + 1, dtype=jnp.float32)).astype(dtype)


class CausalDepthwiseConv(nn.Module):
    """Depthwise causal conv over time; `weight` is [kernel, channels]."""

    kernel_size: int
    use_bias: bool = True
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btc: jax.Array, prefix_bkc: jax.Array,
                 doc_bt: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Returns (conv output [b,t,c], the last kernel-1 inputs as the new prefix).

        Accumulated in float32, so the weight and bias gradients (sums over batch and time) are too.
        With packed documents (`doc_bt`, see `nemojax.model.documents`) each output sees only the
        inputs of its own document, and the new prefix keeps only the last document's inputs.
        """
        channels = x_btc.shape[-1]
        weight = self.param("weight", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=0, out_axis=1), ("conv_kernel", "conv_dim")),
            (self.kernel_size, channels), self.param_dtype)
        full = jnp.concatenate([prefix_bkc.astype(x_btc.dtype), x_btc], axis=1)
        t = x_btc.shape[1]
        w = weight.astype(jnp.float32)
        if doc_bt is None:
            out = sum(full[:, j:j + t].astype(jnp.float32) * w[j] for j in range(self.kernel_size))
        else:
            doc_full = documents.with_prefix(doc_bt, self.kernel_size - 1)
            tap = lambda j: full[:, j:j + t].astype(jnp.float32) * (doc_full[:, j:j + t] == doc_bt)[..., None]
            out = sum(tap(j) * w[j] for j in range(self.kernel_size))
            full = full * (doc_full == doc_bt[:, -1:])[..., None].astype(full.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_dim",)),
                              (channels,), self.param_dtype)
            out = out + bias.astype(jnp.float32)
        return out.astype(x_btc.dtype), full[:, full.shape[1] - (self.kernel_size - 1):]


class MambaMixer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd: jax.Array, valid_bt: jax.Array | None = None,
                 cache: MambaCache | None = None,
                 per_position_states: bool = False) -> tuple[jax.Array, MambaCache | None]:
        c = self.config
        dtype, pdtype = dtype_of(c.compute_dtype), dtype_of(c.param_dtype)
        b, t, _ = x_btd.shape
        valid_bt, doc_bt = documents.split_valid(valid_bt)
        h, p, g, n = c.mamba_num_heads, c.mamba_head_dim, c.n_groups, c.ssm_state_size

        inner_g, conv_g = c.mamba_inner // g, c.mamba_conv_dim // g  # per-group widths
        proj = Linear(c.mamba_inner + c.mamba_conv_dim + h, ("embed", "mamba_proj"), dtype, pdtype,
                      config=c, name="in_proj")(x_btd)
        proj = sharding.constrain(proj.reshape(b, t, g, -1), ("batch", "length", "mamba_groups", None))
        z, xbc, dt_raw = jnp.split(proj, [inner_g, inner_g + conv_g], axis=-1)
        z, xbc, dt_raw = z.reshape(b, t, -1), xbc.reshape(b, t, -1), dt_raw.reshape(b, t, h)
        mask = None if valid_bt is None else valid_bt[..., None].astype(dtype)
        if mask is not None:
            xbc = xbc * mask
        prefix = (cache["conv"] if cache is not None
                  else jnp.zeros((b, c.conv_kernel - 1, c.mamba_conv_dim), dtype))
        conv_in = xbc
        xbc, new_conv = CausalDepthwiseConv(c.conv_kernel, c.use_conv_bias, pdtype, name="conv1d")(xbc, prefix, doc_bt)
        xbc = jax.nn.silu(xbc)
        if mask is not None:
            xbc = xbc * mask
        x, bm, cm = jnp.split(xbc.reshape(b, t, g, conv_g), [inner_g, inner_g + n], axis=-1)

        def head_param(name, init):
            return self.param(name, nn.with_logical_partitioning(init, ("mamba_heads",)), (h,), pdtype)

        dt_bias = head_param("dt_bias", _dt_bias_init)
        a_log = head_param("A_log", _a_log_init)
        d_skip = head_param("D", nn.initializers.ones)
        dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        dt = jnp.clip(dt, c.time_step_limit[0], c.time_step_limit[1])
        if valid_bt is not None:
            dt = dt * valid_bt[..., None]
        a = -jnp.exp(a_log.astype(jnp.float32))

        x_bthp = x.reshape(b, t, h, p)
        initial = cache["ssm"] if cache is not None else None
        if cache is not None and per_position_states:
            y, state = ssd.ssd_sequential(x_bthp, dt, a, bm, cm, initial, all_states=True, doc_bt=doc_bt)
            full = jnp.concatenate([prefix.astype(conv_in.dtype), conv_in], axis=1)
            new_conv = jnp.stack([full[:, i + 1:i + c.conv_kernel] for i in range(t)], axis=1)
            if doc_bt is not None:  # the state after position i keeps only the inputs of i's document
                doc_full = documents.with_prefix(doc_bt, c.conv_kernel - 1)
                same = jnp.stack([doc_full[:, i + 1:i + c.conv_kernel] == doc_bt[:, i:i + 1] for i in range(t)], 1)
                new_conv = new_conv * same[..., None].astype(new_conv.dtype)
        elif cache is not None and t == 1:
            y, state = dispatch.ssd_step(initial, x_bthp[:, 0], dt[:, 0], a, bm[:, 0], cm[:, 0], kernels=c.kernels)
            y = y[:, None]
        else:
            y, state = dispatch.ssd_chunked(x_bthp, dt, a, bm, cm, c.chunk_size, initial, kernels=c.kernels,
                                            doc_bt=doc_bt)
        if cache is not None and valid_bt is not None and not per_position_states:
            full = jnp.concatenate([prefix.astype(conv_in.dtype), conv_in], axis=1)
            end_b = filled_length(valid_bt, t)
            if doc_bt is not None:  # the kept inputs are those of the last valid position's document
                doc_full = documents.with_prefix(doc_bt, c.conv_kernel - 1)
                last_b1 = jnp.take_along_axis(doc_full, (end_b + c.conv_kernel - 2)[:, None], axis=1)
                full = full * (doc_full == last_b1)[..., None].astype(full.dtype)
            new_conv = jax.vmap(lambda f, e: jax.lax.dynamic_slice_in_dim(f, e, c.conv_kernel - 1))(full, end_b)
        y = y + d_skip.astype(jnp.float32)[:, None] * x_bthp.astype(jnp.float32)
        y = sharding.constrain(y.reshape(b, t, g, c.mamba_inner // g), ("batch", "length", "mamba_groups", None))
        y = y.reshape(b, t, c.mamba_inner)
        y = GatedGroupRMSNorm(g, c.layer_norm_epsilon, pdtype, name="norm")(y, z)
        out_init = default_init(0.02 / math.sqrt(2 * c.num_layers))
        out = Linear(c.hidden_size, ("mamba_inner", "embed"), dtype, pdtype, out_init, config=c, name="out_proj")(
            y.astype(dtype))
        new_cache = None if cache is None else {"conv": new_conv.astype(cache["conv"].dtype), "ssm": state}
        return out, new_cache
