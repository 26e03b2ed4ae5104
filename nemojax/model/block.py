"""One layer of the stack: a pre-norm residual block around its mixer (mamba, attention, moe or mlp)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from nemojax import sharding
from nemojax.config import ModelConfig
from nemojax.model.attention import Attention
from nemojax.model.layers import RMSNorm, dtype_of
from nemojax.model.mamba import MambaMixer
from nemojax.model.mlp import MLP
from nemojax.model.moe import MoE

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """Pre-norm residual block around one mixer (mamba, attention, moe or mlp)."""

    config: ModelConfig
    kind: str

    def setup(self) -> None:
        c = self.config
        self.norm = RMSNorm(c.layer_norm_epsilon, dtype_of(c.param_dtype))
        mixers = {"mamba": lambda: MambaMixer(c), "attention": lambda: Attention(c), "moe": lambda: MoE(c),
                  "mlp": lambda: MLP(c, c.intermediate_size)}
        self.mixer = mixers[self.kind]()

    def __call__(self, x_btd: jax.Array, valid_bt: jax.Array | None, cache: Any, index: jax.Array | int,
                 per_position_states: bool = False, slot: jax.Array | int | None = None) -> tuple[jax.Array, Any]:
        """`slot`: this layer's row when `cache` is stacked over the attention layers (scanned layers)."""
        h = self.norm(x_btd)
        if self.kind == "mamba":
            out, cache = self.mixer(h, valid_bt, cache, per_position_states)
        elif self.kind == "attention":
            out, cache = self.mixer(h, valid_bt, cache, index, slot)
        else:
            out = self.mixer(h)
        x_btd = x_btd + out.astype(x_btd.dtype)
        return sharding.constrain(x_btd, ("batch", "length", "act_embed")), cache

    def create(self, x_btd: jax.Array) -> jax.Array:
        """Run once without a cache: creates the block's variables (how stacked blocks are initialised)."""
        return self(x_btd, None, None, 0)[0]

    def record(self, stats: dict[str, jax.Array]) -> None:
        """Sow a MoE block's routing statistics (see `MoE.record`)."""
        self.mixer.record(stats)


def block_class(config: ModelConfig) -> type[Block]:
    """Block, rematerialised per layer by `config.remat` (the unrolled stack and the MTP block)."""
    if config.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[config.remat], prevent_cse=True, static_argnums=(5,))
