"""Exact parameter counts of a model, read from its abstract variables (no memory is allocated).

Only the `params` collection is counted as parameters. The MoE routers' `e_score_correction_bias`
vectors live in `buffers` (they choose experts but are not trained by gradient); they are counted
separately because the published checkpoints store them as tensors, so a count over the
checkpoint's tensor list is `params_main + buffers_main` (Super: 120,668,707,840).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax

from nemojax.config import ModelConfig
from nemojax.model import abstract_variables

Leaves = list[tuple[str, jax.ShapeDtypeStruct]]


def leaf_paths(tree) -> Leaves:
    """(slash-joined path, leaf) pairs, e.g. ("backbone/layers_1/mixer/experts/up_proj", leaf)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf) for path, leaf in flat]


def per_layer(config: ModelConfig) -> ModelConfig:
    """The config with its layers unrolled: planning reads variables per layer (one expert axis first
    in every routed-expert leaf); the stacked layout of scanned layers holds the same arrays, sharded
    the same way (its stacking axis is never split), so counts and bytes are equal."""
    return config.replace(scan_layers=False)


def is_mtp(path: str) -> bool:
    return path.startswith("mtp/")


def is_routed_expert(path: str) -> bool:
    """The stacked routed-expert weights ([E, ...]) of a MoE mixer, main model or MTP."""
    return "/mixer/experts/" in path


def size_of(leaf: jax.ShapeDtypeStruct) -> int:
    return math.prod(leaf.shape)


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Parameter counts; `active` is the per-token count of the main model (top-k experts only)."""

    main: int
    mtp: int
    active: int
    buffers_main: int
    buffers_mtp: int

    @property
    def total(self) -> int:
        return self.main + self.mtp

    def as_dict(self) -> dict[str, int]:
        return {
            "params_total": self.total,
            "params_main": self.main,
            "params_mtp": self.mtp,
            "params_active": self.active,
            "buffers_main": self.buffers_main,
            "buffers_mtp": self.buffers_mtp,
            "checkpoint_tensors_main": self.main + self.buffers_main,
        }


@functools.lru_cache(maxsize=8)
def count_parameters(config: ModelConfig) -> ParamCounts:
    """Count every parameter of `config`'s model; see the module docstring for what counts."""
    variables = abstract_variables(per_layer(config))
    params = leaf_paths(variables["params"])
    buffers = leaf_paths(variables.get("buffers", {}))
    main = sum(size_of(x) for p, x in params if not is_mtp(p))
    mtp = sum(size_of(x) for p, x in params if is_mtp(p))
    unused = config.n_routed_experts - config.num_experts_per_tok
    inactive = sum(size_of(x) // x.shape[0] * unused for p, x in params if is_routed_expert(p) and not is_mtp(p))
    return ParamCounts(
        main=main,
        mtp=mtp,
        active=main - inactive,
        buffers_main=sum(size_of(x) for p, x in buffers if not is_mtp(p)),
        buffers_mtp=sum(size_of(x) for p, x in buffers if is_mtp(p)),
    )
