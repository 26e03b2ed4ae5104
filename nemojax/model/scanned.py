"""The main stack as one `jax.lax.scan` over its layers (`ModelConfig.scan_layers`).

Compile time and program size of the unrolled stack grow with depth (52-108 layers in the published
models, and every serving shape compiles the whole stack again). Scanned, each layer kind is traced
and compiled once, whatever the depth.

How the irregular hybrid pattern is handled: the variables and caches of each kind are stacked
(`nemojax.model.stacking`: `backbone/layers/{kind}/...` with a leading axis over that kind's
layers), and one scan step per layer switches (`lax.switch`) on the layer's kind and runs that
kind's block on its row of the stack. The alternative, scanning repeated sub-patterns, does not fit
the published patterns without many scans: Nano is MEMEM*E x 5 + MEMEMEM*E + MEMEMEME, and Super
and Ultra interleave attention after 3 or 4 ME pairs irregularly, so each run of identical units
would be its own scan and compile separately.

Costs of the switch, kept in view:
- Reverse-mode differentiation of a `lax.switch` keeps the residuals of every branch (zeros for the
  ones not taken) for every step. With `remat="full"` (per-layer checkpoint, the setting for large
  models) each layer saves only its input and the extra is transient. With `remat="none"` or
  `"dots"` the scan keeps, per layer, the residuals of all kinds present.
- One conditional per layer at run time.

Caches: attention layers write their new keys into the stacked KV cache in place (their `slot`
given, see `nemojax.model.attention.write_kv_cache`); Mamba states are small and read / written as
rows. With `per_position_states` (speculative verification) the Mamba rows are written to a new
[n, b, t, ...] stack.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nemojax.config import ModelConfig
from nemojax.model.block import REMAT_POLICIES, Block
from nemojax.model.moe import moe_stat_shapes
from nemojax.model.stacking import LAYERS_NAME, StackPlan, stack_plan


def _stacked_block(config: ModelConfig, kind: str, count: int) -> nn.Module:
    """`count` blocks of one kind as one module whose variables have a leading "layers" axis.

    Only used to create the variables (`create`) and to sow routing statistics (`record`); the
    forward runs the plain block on one row at a time inside the scan.
    """
    common = dict(variable_axes={"params": 0, "buffers": 0, "intermediates": 0}, split_rngs={"params": True},
                  axis_size=count, metadata_params={nn.PARTITION_NAME: LAYERS_NAME})
    stacked = nn.vmap(Block, methods={"create": dict(common, in_axes=None, out_axes=0),
                                      "record": dict(common, in_axes=0, out_axes=0)})
    return stacked(config, kind, name=kind)


def _row(tree: Any, slot: jax.Array) -> Any:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, slot, 0, keepdims=False), tree)


def _set_row(tree: Any, rows: Any, slot: jax.Array) -> Any:
    return jax.tree.map(lambda a, r: jax.lax.dynamic_update_index_in_dim(a, r.astype(a.dtype), slot, 0), tree, rows)


class ScannedLayers(nn.Module):
    """All layers of the main stack, run as one scan. Same inputs and outputs as the unrolled loop,
    with caches in the stacked layout."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd: jax.Array, valid_bt: jax.Array | None, caches: dict | None,
                 index: jax.Array | int, per_position_states: bool = False) -> tuple[jax.Array, dict | None]:
        c = self.config
        plan = stack_plan(c)
        stacks = {kind: _stacked_block(c, kind, plan.count(kind)) for kind in plan.kinds}
        if self.is_initializing():
            for stack in stacks.values():
                stack.create(x_btd)
        variables = {kind: {col: nn.meta.unbox(self.variables[col][kind])
                            for col in ("params", "buffers") if kind in self.variables.get(col, {})}
                     for kind in plan.kinds}
        x_btd, caches, moe_stats = _scan(c, plan, variables, x_btd, valid_bt, caches, index, per_position_states)
        if moe_stats is not None:
            stacks["moe"].record(moe_stats)
        return x_btd, caches


def _per_position_buffers(mamba: dict, t: int) -> dict:
    """Zero [n, b, t, ...] stacks for the Mamba states after every one of t positions."""
    return jax.tree.map(lambda a: jnp.zeros(a.shape[:2] + (t,) + a.shape[2:], a.dtype), mamba)


def _scan(config: ModelConfig, plan: StackPlan, variables: dict, x_btd: jax.Array, valid_bt: jax.Array | None,
          caches: dict | None, index: jax.Array | int, per_position_states: bool):
    """Returns (x, new caches, the MoE layers' statistics stacked ({name: [n_moe, ...]}) or None)."""
    has_moe = "moe" in plan.kinds
    inputs = caches  # Mamba rows are read from here when the outputs go to new per-position stacks
    if caches is not None and per_position_states and "mamba" in caches:
        caches = dict(caches, mamba=_per_position_buffers(caches["mamba"], x_btd.shape[1]))

    def branch(kind: str):
        block = Block(config, kind)

        def run(operands):
            x, cache, slot = operands
            layer_cache = None
            if cache is not None and kind == "attention":
                layer_cache = cache["attention"]
            elif cache is not None and kind == "mamba":
                layer_cache = _row((inputs if per_position_states else cache)["mamba"], slot)
            (x, new_cache), state = block.apply(
                _row(variables[kind], slot), x, valid_bt, layer_cache, index, per_position_states,
                slot if kind == "attention" else None, mutable=["intermediates"])
            if cache is not None and kind == "attention":
                cache = dict(cache, attention=new_cache)
            elif cache is not None and kind == "mamba":
                cache = dict(cache, mamba=_set_row(cache["mamba"], new_cache, slot))
            if not has_moe:
                return x, cache, None
            if kind == "moe":
                stats = {name: value[0] for name, value in state["intermediates"]["mixer"].items()}
            else:
                stats = {name: jnp.zeros(s.shape, s.dtype) for name, s in moe_stat_shapes(config).items()}
            return x, cache, stats
        return run

    branches = [branch(kind) for kind in plan.kinds]

    def step(carry, layer):
        x, cache = carry
        kind_id, slot = layer
        if len(branches) == 1:
            x, cache, stats = branches[0]((x, cache, slot))
        else:
            x, cache, stats = jax.lax.switch(kind_id, branches, (x, cache, slot))
        return (x, cache), stats

    if config.remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[config.remat], prevent_cse=False)
    (x_btd, caches), stats = jax.lax.scan(step, (x_btd, caches), (jnp.asarray(plan.kind_ids), jnp.asarray(plan.slots)))
    if not has_moe:
        return x_btd, caches, None
    rows = np.asarray(plan.layers_of("moe"))
    return x_btd, caches, {name: value[rows] for name, value in stats.items()}
