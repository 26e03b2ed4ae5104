"""The two layouts of the main stack's variables and caches, and conversions between them.

- per layer (`scan_layers=False`): variables under `backbone/layers_{i}/...`, caches a tuple with
  one entry per layer (None for MoE/MLP layers);
- stacked per kind (`scan_layers=True`): variables under `backbone/layers/{kind}/...` with a
  leading axis over that kind's layers in the order of the layer list; caches a dict
  {kind: the kind's caches stacked the same way} for the kinds that have one (mamba, attention).

Layer i of kind k is row `slots[i]` of k's stack. Conversions are exact copies (tests compare the
layouts; `checkpoint.orbax.load_model` converts a checkpoint written in the other layout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.config import LAYER_KINDS, ModelConfig

LAYERS_NAME = "layers"  # module name of the stacked layers (under "backbone")


@dataclasses.dataclass(frozen=True)
class StackPlan:
    """Where each layer of the main stack lives in the stacked layout."""

    kinds: tuple[str, ...]          # the kinds present, in LAYER_KINDS order (the scan's switch branches)
    kind_ids: np.ndarray            # [num_layers] index into `kinds`
    slots: np.ndarray               # [num_layers] row in its kind's stack

    def count(self, kind: str) -> int:
        return int(np.sum(self.kind_ids == self.kinds.index(kind))) if kind in self.kinds else 0

    def layers_of(self, kind: str) -> np.ndarray:
        """Layer numbers of `kind`, in stack order."""
        return np.nonzero(self.kind_ids == self.kinds.index(kind))[0]


def stack_plan(config: ModelConfig) -> StackPlan:
    kinds = tuple(k for k in LAYER_KINDS if k in config.layer_types)
    kind_ids = np.asarray([kinds.index(k) for k in config.layer_types], np.int32)
    slots = np.zeros(len(kind_ids), np.int32)
    for k in range(len(kinds)):
        rows = kind_ids == k
        slots[rows] = np.arange(int(rows.sum()))
    return StackPlan(kinds, kind_ids, slots)


def stacked_caches(config: ModelConfig, one_layer: Callable[[str], Any]) -> dict[str, Any]:
    """Empty stacked caches: `one_layer(kind)` (one layer's empty cache, None if the kind has none)
    repeated over the kind's layers."""
    plan = stack_plan(config)
    out = {}
    for kind in plan.kinds:
        template = one_layer(kind)
        if template is not None:
            n = plan.count(kind)
            out[kind] = jax.tree.map(lambda a, n=n: jnp.zeros((n,) + a.shape, a.dtype), template)
    return out


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *rows: jnp.stack(rows), *trees)


def stack_layer_caches(config: ModelConfig, layer_caches: tuple[Any, ...]) -> dict[str, Any]:
    """Per-layer caches (a tuple) -> caches stacked per kind."""
    plan = stack_plan(config)
    return {kind: _stack([layer_caches[i] for i in plan.layers_of(kind)])
            for kind in plan.kinds if layer_caches[plan.layers_of(kind)[0]] is not None}


def unstack_layer_caches(config: ModelConfig, stacked: dict[str, Any]) -> tuple[Any, ...]:
    """Caches stacked per kind -> one entry per layer (None for kinds without a cache)."""
    plan = stack_plan(config)
    return tuple(None if kind not in stacked else jax.tree.map(lambda a, s=slot: a[s], stacked[kind])
                 for kind, slot in zip(config.layer_types, plan.slots, strict=True))


def stack_variables(config: ModelConfig, variables: dict) -> dict:
    """Variables {"params", "buffers"} in the per-layer layout -> the stacked layout (`config` gives
    the layer list; its own scan_layers is not read)."""
    plan = stack_plan(config)
    out = {}
    for collection, tree in variables.items():
        backbone = {k: v for k, v in tree.get("backbone", {}).items() if not k.startswith(LAYERS_NAME + "_")}
        layers = {}
        for kind in plan.kinds:
            rows = [tree["backbone"].get(f"{LAYERS_NAME}_{i}") for i in plan.layers_of(kind)]
            if all(r is not None for r in rows):
                layers[kind] = _stack(rows)
        if layers:
            backbone[LAYERS_NAME] = layers
        out[collection] = dict(tree, backbone=backbone) if "backbone" in tree else dict(tree)
    return out


def unstack_variables(config: ModelConfig, variables: dict) -> dict:
    """The inverse of `stack_variables`."""
    plan = stack_plan(config)
    out = {}
    for collection, tree in variables.items():
        if "backbone" not in tree:
            out[collection] = dict(tree)
            continue
        backbone = {k: v for k, v in tree["backbone"].items() if k != LAYERS_NAME}
        stacks = tree["backbone"].get(LAYERS_NAME, {})
        for i, (kind, slot) in enumerate(zip(config.layer_types, plan.slots, strict=True)):
            if kind in stacks:
                backbone[f"{LAYERS_NAME}_{i}"] = jax.tree.map(lambda a, s=slot: a[s], stacks[kind])
        out[collection] = dict(tree, backbone=backbone)
    return out


def to_layout(config: ModelConfig, variables: dict, stacked: bool) -> dict:
    """`variables` (in either layout) in the stacked layout if `stacked`, else per layer."""
    is_stacked = LAYERS_NAME in variables.get("params", {}).get("backbone", {})
    if is_stacked == stacked:
        return variables
    return stack_variables(config, variables) if stacked else unstack_variables(config, variables)
