"""Post-training quantization recipes: which published modules get which format.

- `nvfp4-experts`: the main model's routed experts in NVFP4, everything else as it was.
- `fp8`: every linear in FP8 (per tensor; routed experts one module each), lm_head excepted.
- `nvfp4`: every linear in NVFP4, lm_head excepted (ModelOpt's plain NVFP4 config).
- `release`: the mix of the published Nemotron 3 Super/Ultra NVFP4 checkpoints: routed experts
  NVFP4; shared experts and the Mamba in/out projections FP8 (per tensor); attention, latent
  projections, dense MLPs, embeddings, lm_head, conv1d and the whole MTP block kept in BF16; an FP8
  KV cache. (The release keeps "most" Mamba projections in FP8 without saying which are left out;
  this recipe quantizes all of them.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from nemojax.quant.modelopt import QuantScheme

RECIPES = ("nvfp4-experts", "fp8", "nvfp4", "release")
_ROUTED = re.compile(r"backbone\.layers\.\d+\.mixer\.experts\.\d+\.(up|down)_proj")
_SHARED = re.compile(r"backbone\.layers\.\d+\.mixer\.shared_experts\.(up|down)_proj")
_MAMBA = re.compile(r"backbone\.layers\.\d+\.mixer\.(in|out)_proj")


def recipe_scheme(recipe: str, modules: Iterable[str]) -> QuantScheme:
    """The QuantScheme of `recipe` over the model's quantizable modules (published names)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe {recipe!r}: expected one of {RECIPES}")
    formats = {}
    for name in modules:
        if recipe in ("fp8", "nvfp4"):
            if name != "lm_head":
                formats[name] = recipe
        elif _ROUTED.fullmatch(name):
            formats[name] = "nvfp4"
        elif recipe == "release" and (_SHARED.fullmatch(name) or _MAMBA.fullmatch(name)):
            formats[name] = "fp8"
    return QuantScheme(formats, "fp8" if recipe == "release" else None)
