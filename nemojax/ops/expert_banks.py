"""Routed-expert weight banks in each storage format, and the one grouped matmul that reads them.

A bank is a dict of per-expert arrays stacked on a leading expert axis (a bare array is a float bank):
- float: {"kernel": [E, K, N]}; with "train_rng" (a PRNG key) it computes with the NVFP4 training
  recipe (`nemojax.quant.training.nvfp4_train_grouped_matmul`)
- fp8:   {"kernel": float8_e4m3fn [E, K, N], "weight_scale": float32 [E]}
- nvfp4: {"weight": uint8 [E, N, K/2], "weight_scale": float8_e4m3fn [E, N, K/16],
          "weight_scale_2": float32 [E]}   (the ModelOpt layout: [out, in], packed along in)

`bank_mlp` runs both projections of the experts (float banks: `nemojax.ops.expert_mlp.grouped_mlp`).
`bank_matmul` dispatches to the float expert matmul (`expert_matmul`, replaceable in a context with
`use_expert_matmul`: the planner compiles GPU code this way), `grouped_fp8_matmul` or the NVFP4 grouped
matmul (reference or Pallas kernel, `nemojax.ops.dispatch`);
`bank_specs` gives each array's PartitionSpec for expert parallelism (experts over the expert axis,
optionally the in or out feature dimension over another axis).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from nemojax.ops import dispatch
from nemojax.ops.expert_mlp import grouped_mlp
from nemojax.ops.grouped_matmul import grouped_matmul
from nemojax.ops.quantized_matmul import grouped_fp8_matmul
from nemojax.quant.nvfp4 import BLOCK
from nemojax.quant.training import nvfp4_train_grouped_matmul

Bank = dict[str, jax.Array]
Matmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def expert_matmul(x_mk: jax.Array, w_ekn: jax.Array, group_sizes_e: jax.Array) -> jax.Array:
    """The float experts' grouped matmul: each chosen expert's weight cast to the activations' dtype (a
    decoding step converts only the routed experts, never the whole bank), float32 results (so the weight
    gradient leaves the matmul in float32 and is reduced across devices in float32)."""
    return grouped_matmul(x_mk, w_ekn, group_sizes_e, preferred_element_type=jnp.float32)


_EXPERT_MATMUL: contextvars.ContextVar[Matmul] = contextvars.ContextVar("expert_matmul", default=expert_matmul)


@contextlib.contextmanager
def use_expert_matmul(matmul: Matmul) -> Iterator[Matmul]:
    """Make `matmul(x_mk, w_ekn, group_sizes_e)` the float experts' grouped matmul for the models traced in
    this context (the planner compiles the GPU path this way; tests count the rows it receives)."""
    token = _EXPERT_MATMUL.set(matmul)
    try:
        yield matmul
    finally:
        _EXPERT_MATMUL.reset(token)


def current_expert_matmul() -> Matmul:
    """The grouped matmul set by `use_expert_matmul` (default `expert_matmul`)."""
    return _EXPERT_MATMUL.get()


def as_bank(weights: Any) -> Bank:
    """A bank dict (a bare [E, K, N] array is a float bank)."""
    return weights if isinstance(weights, dict) else {"kernel": weights}


def bank_format(bank: Bank) -> str:
    """"nvfp4" | "fp8" | "float" (stored formats) or "nvfp4-train" (float weights, the training recipe)."""
    if "weight" in bank:
        return "nvfp4"
    if "train_rng" in bank:
        return "nvfp4-train"
    return "fp8" if "weight_scale" in bank else "float"


def bank_matmul(x_mk: jax.Array, bank: Bank, group_sizes_e: jax.Array, *, kernels: str = "auto",
                per_shard: bool = False) -> jax.Array:
    """Rows sorted by expert times their expert's weight: [M, N] in x's dtype (zeros past the groups).
    NVFP4 banks go through `nemojax.ops.dispatch` (`kernels`, `per_shard`: see there)."""
    fmt = bank_format(bank)
    if fmt == "nvfp4":
        return dispatch.nvfp4_grouped_matmul(x_mk, bank["weight"], bank["weight_scale"], bank["weight_scale_2"],
                                             group_sizes_e, kernels=kernels, per_shard=per_shard)
    if fmt == "fp8":
        return grouped_fp8_matmul(x_mk, bank["kernel"], bank["weight_scale"], group_sizes_e)
    if fmt == "nvfp4-train":
        return nvfp4_train_grouped_matmul(x_mk, bank["kernel"], group_sizes_e, bank["train_rng"])
    return current_expert_matmul()(x_mk, bank["kernel"], group_sizes_e).astype(x_mk.dtype)


def bank_mlp(x_mk: jax.Array, up: Bank, down: Bank, group_sizes_e: jax.Array,
             activation: Callable[[jax.Array], jax.Array], *, kernels: str = "auto") -> jax.Array:
    """activation(x @ up[g]) @ down[g] for rows sorted by expert: [M, N] in x's dtype. Float banks with the
    default expert matmul take `grouped_mlp` (both projections in one pass over the experts on CPU, the
    same values); otherwise two `bank_matmul` calls."""
    if bank_format(up) == bank_format(down) == "float" and current_expert_matmul() is expert_matmul:
        return grouped_mlp(x_mk, up["kernel"], down["kernel"], group_sizes_e, activation)
    h = activation(bank_matmul(x_mk, up, group_sizes_e, kernels=kernels))
    return bank_matmul(h, down, group_sizes_e, kernels=kernels)


def num_experts(bank: Bank) -> int:
    return next(iter(bank.values())).shape[0]


def in_features(bank: Bank) -> int:
    """K, the contracted width."""
    return 2 * bank["weight"].shape[2] if bank_format(bank) == "nvfp4" else bank["kernel"].shape[1]


def splits_features(bank: Bank, dim: str, parts: int) -> bool:
    """Whether the "in" or "out" feature dimension splits into `parts` equal shards (for NVFP4 "in":
    whole 16-blocks, so that packed codes and their scales split together)."""
    if bank_format(bank) == "nvfp4":
        size = in_features(bank) // BLOCK if dim == "in" else bank["weight"].shape[1]
    else:
        size = bank["kernel"].shape[1 if dim == "in" else 2]
    return size % parts == 0


def bank_specs(bank: Bank, expert_axis: str, dim: str | None = None, axis: str | None = None) -> dict[str, Any]:
    """PartitionSpecs of a bank's arrays: experts over `expert_axis`, the `dim` ("in" or "out") feature
    dimension over `axis` (if given)."""
    in_axis, out_axis = (axis if dim == "in" else None), (axis if dim == "out" else None)
    specs = {}
    for name, value in bank.items():
        if value.ndim == 0:  # the training recipe's key
            specs[name] = PartitionSpec()
        elif value.ndim == 1:
            specs[name] = PartitionSpec(expert_axis)
        elif name == "kernel":  # [E, K, N]
            specs[name] = PartitionSpec(expert_axis, in_axis, out_axis)
        else:  # NVFP4 [E, N, K/2] and [E, N, K/16]
            specs[name] = PartitionSpec(expert_axis, out_axis, in_axis)
    return specs
