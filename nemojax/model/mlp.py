"""Dense relu² MLP (Nemotron-H `-` layers, and the MoE shared expert)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from nemojax import sharding
from nemojax.config import ModelConfig
from nemojax.model.layers import Linear, default_init, dtype_of, relu2


class MLP(nn.Module):
    config: ModelConfig
    intermediate_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dtype, pdtype = dtype_of(c.compute_dtype), dtype_of(c.param_dtype)
        h = relu2(Linear(self.intermediate_size, ("embed", "mlp"), dtype, pdtype, config=c, name="up_proj")(x))
        h = sharding.constrain(h, ("batch", "length", "act_mlp") if h.ndim == 3 else ("batch", "act_mlp"))
        out_init = default_init(0.02 / math.sqrt(2 * c.num_layers))
        return Linear(c.hidden_size, ("mlp", "embed"), dtype, pdtype, out_init, config=c, name="down_proj")(h)
