"""Building blocks shared by every layer kind: linear maps, RMSNorms, dtype helpers.

Parameters are created with logical axis names (`nn.with_logical_partitioning`), so the one rule
table in `nemojax.sharding` decides where each lands on a mesh. Linear kernels are stored
[in, out] (the published checkpoints store [out, in]; the converter transposes).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def default_init(std: float = 0.02) -> Initializer:
    return nn.initializers.normal(stddev=std)


class Linear(nn.Module):
    """y = x @ kernel, no bias (no published Nemotron-H linear has one).

    The product is taken in float32 (`preferred_element_type`) and cast to `dtype`: the kernel's
    gradient then leaves its matmul in float32, so the cross-device reduction of weight gradients
    (data parallelism, FSDP) runs in float32, not in the compute dtype.
    """

    features: int
    axes: tuple[str, str]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = default_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """weight * x / rms(x), accumulated in float32, returned in the input dtype."""

    eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                            (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (weight.astype(jnp.float32) * x32).astype(x.dtype)


class GatedGroupRMSNorm(nn.Module):
    """Mamba-2 output norm: RMSNorm(y * silu(z)) computed separately over `groups` equal slices."""

    groups: int
    eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        width = y.shape[-1]
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("mamba_inner",)),
                            (width,), self.param_dtype)
        h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        h = h.reshape(h.shape[:-1] + (self.groups, width // self.groups))
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return weight.astype(jnp.float32) * h.reshape(y.shape)


def relu2(x: jax.Array) -> jax.Array:
    """Squared ReLU, the activation of every Nemotron-H MLP and expert."""
    return jnp.square(jax.nn.relu(x))
