"""Building blocks shared by every layer kind: linear maps, RMSNorms, dtype helpers.

Parameters are created with logical axis names (`nn.with_logical_partitioning`), so the one rule
table in `nemojax.sharding` decides where each lands on a mesh. Linear kernels are stored
[in, out] (the published checkpoints store [out, in]; the converter transposes).

A linear whose weight key (its per-layer module path joined by "/") the model config lists in `weight_formats`
holds the ModelOpt tensors instead: FP8 `kernel` [in, out] float8_e4m3fn with a float32
`weight_scale` (computed W8A16), or NVFP4 `weight` uint8 [out, in/2] with `weight_scale`
float8_e4m3fn [out, in/16] and `weight_scale_2` float32 (computed W4A16); both keep the checkpoint's
`input_scale` (the activation scale W4A4/W8A8 kernels use; unused here). With `train_quant="nvfp4"`
a float linear computes with the NVFP4 training recipe (`nemojax.quant.training`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.errors import ConfigError
from nemojax.model.stacking import LAYERS_NAME
from nemojax.ops.quantized_matmul import fp8_matmul, nvfp4_matmul
from nemojax.quant.nvfp4 import BLOCK
from nemojax.quant.training import nvfp4_train_matmul

Initializer = Callable[..., jax.Array]
# Random stream of the NVFP4 training recipe (stochastic rounding, Hadamard signs): pass
# rngs={QUANT_RNG: key} to `apply` when training; without it a fixed key is used.
QUANT_RNG = "quant"


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def default_init(std: float = 0.02) -> Initializer:
    return nn.initializers.normal(stddev=std)


def _weight_place(module: nn.Module, names: tuple[str, ...]) -> tuple[str | None, str]:
    """(None, weight key) for a weight of the unrolled model, or (layer kind, key below the layer) for one
    in a scanned stack: at creation under backbone/layers/{kind}, or in a block applied alone in the scan."""
    path = module.path + names
    if path[:2] == ("backbone", LAYERS_NAME):
        return path[2], "/".join(path[3:])
    if path[:1] in (("backbone",), ("mtp",), ("lm_head",)):
        return None, "/".join(path)
    block = module
    while getattr(block, "kind", None) is None:  # the enclosing Block (the root of a block applied alone)
        block = block.parent
    return block.kind, "/".join(path)


def weight_format(config: ModelConfig | None, module: nn.Module, *names: str) -> str | None:
    """The `ModelConfig.weight_formats` entry of `module`'s weight (`names` below it), None for float."""
    if config is None or not config.weight_formats:
        return None
    kind, key = _weight_place(module, names)
    return config.weight_format(key) if kind is None else config.kind_weight_format(kind, key)


def recipe_applies(config: ModelConfig, key: str) -> bool:
    """Whether the weight `key` (per-layer path) computes with the NVFP4 training recipe under `config`."""
    return config.train_quant == "nvfp4" and not any(fnmatch.fnmatchcase(key, p) for p in config.train_quant_keep)


def trains_quantized(config: ModelConfig | None, module: nn.Module, *names: str) -> bool:
    """`recipe_applies` to `module`'s weight; in a scanned stack every layer of the kind must agree."""
    if config is None or config.train_quant == "none":
        return False
    kind, key = _weight_place(module, names)
    if kind is None:
        return recipe_applies(config, key)
    decisions = {recipe_applies(config, f"backbone/{LAYERS_NAME}_{i}/{key}")
                 for i, k in enumerate(config.layer_types) if k == kind}
    if len(decisions) > 1:
        raise ConfigError(f"the NVFP4 recipe keeps {key} of some {kind} layers in the compute dtype and not "
                          "others; scanned layers share one module per kind: set scan_layers=false")
    return decisions.pop()


def quant_rng(module: nn.Module) -> jax.Array:
    """The module's key of the training recipe's random stream (a fixed key when none was given)."""
    return module.make_rng(QUANT_RNG) if module.has_rng(QUANT_RNG) else jax.random.key(0)


def scale_param(module: nn.Module, name: str, shape: tuple[int, ...] = (), axes: tuple[str, ...] = ()) -> jax.Array:
    """A float32 quantization scale (ones at init), replicated unless `axes` say otherwise."""
    return module.param(name, nn.with_logical_partitioning(nn.initializers.ones, axes), shape, jnp.float32)


class Linear(nn.Module):
    """y = x @ kernel, no bias (no published Nemotron-H linear has one). `config` (optional) supplies the
    quantized format of this weight and the training recipe, looked up by the module's path.

    A float kernel's product is taken in float32 (`preferred_element_type`) and cast to `dtype`: the
    kernel's gradient then leaves its matmul in float32, so the cross-device reduction of weight gradients
    (data parallelism, FSDP) runs in float32, not in the compute dtype.
    """

    features: int
    axes: tuple[str, str]
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: Initializer = default_init()
    config: ModelConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fmt = weight_format(self.config, self)
        k, n = x.shape[-1], self.features
        x = x.astype(self.dtype)
        if fmt is None:
            kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes), (k, n),
                                self.param_dtype)
            if trains_quantized(self.config, self):
                return nvfp4_train_matmul(x, kernel.astype(self.dtype), quant_rng(self))
            return jnp.dot(x, kernel.astype(self.dtype), preferred_element_type=jnp.float32).astype(self.dtype)
        zeros = nn.initializers.zeros
        scale_param(self, "input_scale")
        if fmt == "fp8":
            kernel = self.param("kernel", nn.with_logical_partitioning(zeros, self.axes), (k, n), jnp.float8_e4m3fn)
            return fp8_matmul(x, kernel, scale_param(self, "weight_scale"))
        out_in = self.axes[::-1]
        packed = self.param("weight", nn.with_logical_partitioning(zeros, out_in), (n, k // 2), jnp.uint8)
        block_scale = self.param("weight_scale", nn.with_logical_partitioning(nn.initializers.ones, out_in),
                                 (n, k // BLOCK), jnp.float8_e4m3fn)
        return nvfp4_matmul(x, packed, block_scale, scale_param(self, "weight_scale_2"))


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


def filled_length(valid_bt: jax.Array | None, t: int) -> jax.Array | int:
    """How far each row's input reaches: one past its last valid position ([b]; `t` when no mask is given).

    A cached forward advances each row's write position by this much, so a row padded on the right
    (valid tokens first) moves by its real tokens, a left-padded row by the whole chunk (its padding
    keeps masked cache entries), and a row with no valid token in the chunk stays where it was.
    """
    if valid_bt is None:
        return t
    return jnp.max(jnp.where(valid_bt, jnp.arange(1, t + 1, dtype=jnp.int32), 0), axis=1)


def relu2(x: jax.Array) -> jax.Array:
    """Squared ReLU, the activation of every Nemotron-H MLP and expert."""
    return jnp.square(jax.nn.relu(x))
