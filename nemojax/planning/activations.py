"""Activation memory from ahead-of-time compiles on abstract shapes (no real memory is used).

Compiling all layers of a large model is slow, so each distinct part is compiled once on the mesh:
one main block per layer kind present, each MTP sublayer, and the model's ends (final norm +
lm_head + logits). Each compile is `jax.jit(fn, in_shardings, out_shardings).lower(abstract
shapes).compile().memory_analysis()`, on (fake) devices; weights and caches are arguments, so the
compiler's temp buffers are the activations.

- Serving (prefill of `batch x chunk` new tokens against caches of `seq_len`): the layers run one
  after another and keep nothing, so peak = max over parts of (temp + input + output activations).
- Training (`batch x seq_len`, one forward + backward): every layer keeps the residuals its
  backward needs until the backward reaches it. For each part a forward returning its residuals
  (arguments excluded, the layer input added back) measures what it keeps; the compiled VJP
  measures the transient of its backward. peak = sum over all layers of the kept residuals + max
  over parts of (backward temp + input, output and cotangent activations). Conservative: the part
  whose backward runs also counts its own residuals twice. Scanned layers without remat "full"
  keep, per layer, the residuals of every kind (`activation_bytes`).
- The routed experts are compiled with the grouped matmul chosen by the caller (`planning.matmuls`,
  through `use_expert_matmul`), not the CPU path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from nemojax import sharding
from nemojax.config import LAYER_KINDS, ModelConfig
from nemojax.model import abstract_variables
from nemojax.model.attention import init_kv_cache
from nemojax.model.block import block_class
from nemojax.model.hybrid import MTPLayer
from nemojax.model.layers import Linear, RMSNorm, dtype_of
from nemojax.model.mamba import init_mamba_cache
from nemojax.planning.counts import per_layer
from nemojax.planning.layout import array_sharding
from nemojax.sharding import use_mesh
from nemojax.sharding.placement import variable_shardings

ACT_AXES = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True)
class PartMemory:
    """Per-device activation bytes of one compiled part, and how many times the model runs it."""

    name: str
    count: int
    peak_bytes: int
    saved_bytes: int
    compile_seconds: float


class ModelEnds(nn.Module):
    """The final norm and lm_head of `NemotronH` (same layers, same names), returning f32 logits."""

    config: ModelConfig

    @nn.compact
    def __call__(self, hidden_btd: jax.Array) -> jax.Array:
        c = self.config
        h = RMSNorm(c.layer_norm_epsilon, dtype_of(c.param_dtype), name="norm_f")(hidden_btd)
        return Linear(c.vocab_size, ("embed", "vocab"), dtype_of(c.compute_dtype), dtype_of(c.param_dtype),
                      name="lm_head")(h).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Part:
    name: str
    count: int
    module: nn.Module
    num_inputs: int            # activation inputs: x, plus the embedding for the first MTP sublayer
    cache_kind: str | None     # "attention" | "mamba" | None
    run: Callable[..., tuple[jax.Array, Any]]  # (module, variables, inputs, cache, index) -> (y, cache)
    path: tuple[str, ...]      # where its variables sit in the model's {"params", "buffers"} trees

    def select(self, tree: dict) -> dict:
        """This part's slice of a full-model tree (abstract variables or their shardings)."""
        if self.run is _run_ends:
            params = tree["params"]
            return {"params": {"norm_f": params["backbone"]["norm_f"], "lm_head": params["lm_head"]}, "buffers": {}}
        out = {}
        for collection in ("params", "buffers"):
            node = tree.get(collection, {})
            for key in self.path:
                node = node.get(key, {})
            out[collection] = node
        return out


def _run_block(module, variables, inputs, cache, index):
    return module.apply(variables, inputs[0], None, cache, index, False)


def _run_mtp(module, variables, inputs, cache, index):
    return module.apply(variables, inputs[0], inputs[1] if len(inputs) > 1 else None, None, cache, index)


def _run_ends(module, variables, inputs, cache, index):
    return module.apply(variables, inputs[0]), cache


def _cache_kind(kind: str) -> str | None:
    return kind if kind in ("attention", "mamba") else None


def model_parts(config: ModelConfig) -> list[_Part]:
    """One part per distinct main layer kind (its first layer), each MTP sublayer, and the ends."""
    block = block_class(config)
    parts = []
    for kind in dict.fromkeys(config.layer_types):
        first = config.layer_types.index(kind)
        parts.append(_Part(kind, config.layer_types.count(kind), block(config, kind), 1, _cache_kind(kind),
                           _run_block, ("backbone", f"layers_{first}")))
    if config.has_mtp:
        kinds = config.mtp_layer_types
        for i, kind in enumerate(kinds):
            module = MTPLayer(config, kind, i == 0, i == len(kinds) - 1)
            parts.append(_Part(f"mtp.{i}.{kind}", 1, module, 2 if i == 0 else 1, _cache_kind(kind), _run_mtp,
                               ("mtp", f"layers_{i}")))
    parts.append(_Part("norm_f+lm_head", 1, ModelEnds(config), 1, None, _run_ends, ()))
    return parts


@functools.lru_cache(maxsize=2)
def _model_trees(config: ModelConfig, mesh: Mesh) -> tuple[dict, dict]:
    config = per_layer(config)
    return abstract_variables(config), variable_shardings(config, mesh)


def part_variables(part: _Part, config: ModelConfig, mesh: Mesh) -> tuple[dict, dict]:
    """The part's abstract variables and the shardings the real model gives them on `mesh`."""
    variables, shardings = _model_trees(config, mesh)
    return part.select(variables), part.select(shardings)


def _abstract_cache(part: _Part, config: ModelConfig, batch: int, max_len: int):
    dtype = dtype_of(config.compute_dtype)
    if part.cache_kind == "attention":
        return jax.eval_shape(lambda: init_kv_cache(config, batch, max_len, dtype))
    if part.cache_kind == "mamba":
        return jax.eval_shape(lambda: init_mamba_cache(config, batch, dtype))
    return None


def _bytes_per_device(leaves: Sequence[jax.ShapeDtypeStruct], shardings: Sequence[NamedSharding]) -> int:
    return sum(math.prod(sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
               for leaf, sharding in zip(leaves, shardings, strict=True))


def _memory(compiled) -> Any:
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this JAX backend reports no memory analysis for compiled programs")
    return stats


def serving_part(part: _Part, config: ModelConfig, mesh: Mesh, batch: int, chunk: int, max_len: int) -> PartMemory:
    """Prefill of `batch x chunk` tokens through one part, with its cache of `max_len` donated."""
    start = time.perf_counter()
    variables, var_shardings = part_variables(part, config, mesh)
    act = jax.ShapeDtypeStruct((batch, chunk, config.hidden_size), dtype_of(config.compute_dtype))
    act_sharding = array_sharding(mesh, act.shape, ACT_AXES)
    inputs, input_shardings = (act,) * part.num_inputs, (act_sharding,) * part.num_inputs
    cache = _abstract_cache(part, config, batch, max_len)
    cache_shardings = None if cache is None else sharding.cache_shardings(cache, mesh, sharding.head_units(config))
    index = jax.ShapeDtypeStruct((), jnp.int32)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    if part.run is _run_ends:
        out = jax.ShapeDtypeStruct((batch, chunk, config.vocab_size), jnp.float32)
        out_sharding = array_sharding(mesh, out.shape, ("batch", "length", "vocab"))
    else:
        out, out_sharding = act, act_sharding

    def prefill(variables, inputs, cache, index):
        return part.run(part.module, variables, inputs, cache, index)

    with use_mesh(mesh):
        compiled = jax.jit(prefill, in_shardings=(var_shardings, input_shardings, cache_shardings, replicated),
                           out_shardings=(out_sharding, cache_shardings), donate_argnums=(2,)
                           ).lower(variables, inputs, cache, index).compile()
    stats = _memory(compiled)
    io = _bytes_per_device(list(inputs) + [out], list(input_shardings) + [out_sharding])
    return PartMemory(part.name, part.count, stats.temp_size_in_bytes + io, 0, time.perf_counter() - start)


def _loss_fn(part: _Part, config: ModelConfig) -> Callable:
    """Scalar the backward starts from: <output, cotangent> for a layer, the LM loss for the ends."""
    if part.run is _run_ends:
        def loss(params, buffers, inputs, labels):
            logits, _ = part.run(part.module, {"params": params, "buffers": buffers}, inputs, None, 0)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    else:
        def loss(params, buffers, inputs, cotangent):
            y, _ = part.run(part.module, {"params": params, "buffers": buffers}, inputs, None, 0)
            return jnp.sum(y.astype(jnp.float32) * cotangent.astype(jnp.float32))
    return loss


def training_part(part: _Part, config: ModelConfig, mesh: Mesh, batch: int, seq_len: int) -> PartMemory:
    """Forward + backward of one part on `batch x seq_len` tokens: kept residuals and backward peak."""
    start = time.perf_counter()
    variables, var_shardings = part_variables(part, config, mesh)
    params, buffers = variables["params"], variables.get("buffers", {})
    param_sh, buffer_sh = var_shardings["params"], var_shardings.get("buffers", {})
    act = jax.ShapeDtypeStruct((batch, seq_len, config.hidden_size), dtype_of(config.compute_dtype))
    act_sharding = array_sharding(mesh, act.shape, ACT_AXES)
    inputs, input_shardings = (act,) * part.num_inputs, (act_sharding,) * part.num_inputs
    if part.run is _run_ends:
        target = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
        target_sharding = array_sharding(mesh, target.shape, ("batch", "length"))
    else:
        target, target_sharding = act, act_sharding
    loss = _loss_fn(part, config)

    def residuals(params, buffers, inputs, target):
        _, backward = jax.vjp(lambda p, x: loss(p, buffers, x, target), params, inputs)
        arguments = jax.tree.leaves((params, buffers, inputs, target))
        return [r for r in jax.tree.leaves(backward) if not any(r is a for a in arguments)]

    def gradients(params, buffers, inputs, target):
        return jax.grad(loss, argnums=(0, 2))(params, buffers, inputs, target)

    in_shardings = (param_sh, buffer_sh, input_shardings, target_sharding)
    with use_mesh(mesh):
        kept = _memory(jax.jit(residuals, in_shardings=in_shardings).lower(params, buffers, inputs, target).compile())
        backward = _memory(jax.jit(gradients, in_shardings=in_shardings, out_shardings=(param_sh, input_shardings))
                           .lower(params, buffers, inputs, target).compile())
    io = _bytes_per_device(list(inputs) * 2 + [target], list(input_shardings) * 2 + [target_sharding])
    saved = kept.output_size_in_bytes + _bytes_per_device(inputs, input_shardings)
    return PartMemory(part.name, part.count, backward.temp_size_in_bytes + io, saved, time.perf_counter() - start)


def activation_bytes(parts: Sequence[PartMemory], train: bool, scanned_layers: int = 0) -> int:
    """Combine the parts (see the module docstring). `scanned_layers`: the main stack's depth when it
    runs as a scan that keeps every kind's residuals at every layer (scan_layers without remat "full":
    a `lax.switch` keeps the residuals of all its branches); each layer then keeps the sum over kinds."""
    peak = max(p.peak_bytes for p in parts)
    if not train:
        return peak
    main = [p for p in parts if p.name in LAYER_KINDS]
    kept = sum(p.count * p.saved_bytes for p in parts if p not in main)
    if scanned_layers:
        return peak + kept + scanned_layers * sum(p.saved_bytes for p in main)
    return peak + kept + sum(p.count * p.saved_bytes for p in main)
