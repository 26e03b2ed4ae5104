"""LatentMoE: sigmoid router with correction bias and group-limited top-k, dropless routed experts
computed in a latent space, plus a shared expert on the full-width input.

The router runs in float32. `e_score_correction_bias` lives in the `buffers` collection: it only
chooses experts (it never weights them) and is updated by load balancing, not by gradients.
Routed experts are dropless: token copies are sorted by expert and go through one grouped matmul
per projection (`nemojax.ops.expert_banks.bank_matmul`, for float, FP8 or NVFP4 experts; float experts
both projections at once, `nemojax.ops.expert_banks.bank_mlp`), never every expert on every token.
Expert-parallel (an "expert" mesh axis) they may be bounded by `moe_capacity_factor` (dropped copies
are counted).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.model.layers import (
    Linear,
    default_init,
    dtype_of,
    quant_rng,
    relu2,
    scale_param,
    trains_quantized,
    weight_format,
)
from nemojax.model.mlp import MLP
from nemojax.ops.expert_banks import Bank, as_bank, bank_mlp, num_experts
from nemojax.ops.expert_parallel import expert_parallel_moe, uses_expert_parallelism
from nemojax.quant.nvfp4 import BLOCK


def route(scores_te: jax.Array, bias_e: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Choose experts on (scores + bias), group-limited; weight them by the uncorrected scores.

    Returns (expert ids [t, k] int32, weights [t, k] float32).
    """
    c = config
    t, e = scores_te.shape
    choice = scores_te + bias_e[None, :]
    if c.n_group > 1:
        grouped = choice.reshape(t, c.n_group, e // c.n_group)
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
        _, keep = jax.lax.top_k(group_scores, c.topk_group)
        group_mask = jnp.any(jax.nn.one_hot(keep, c.n_group, dtype=bool), axis=1)
        choice = jnp.where(jnp.repeat(group_mask, e // c.n_group, axis=1), choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, c.num_experts_per_tok)
    weights = jnp.take_along_axis(scores_te, ids, axis=1)
    if c.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return ids.astype(jnp.int32), weights * c.routed_scaling_factor


def dropless_experts(x_td: jax.Array, ids_tk: jax.Array, weights_tk: jax.Array, up: Bank | jax.Array,
                     down: Bank | jax.Array, kernels: str = "auto") -> jax.Array:
    """sum_k weights[t,k] * down[e](relu²(up[e](x[t]))) with e = ids[t,k]; exact and dropless.
    `up` / `down`: expert banks of any storage format (a bare array is a float bank); `kernels`: the
    config field choosing the NVFP4 matmul (`nemojax.ops.dispatch`)."""
    up, down = as_bank(up), as_bank(down)
    t, k = ids_tk.shape
    flat_ids = ids_tk.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat_ids, length=num_experts(up))
    y = bank_mlp(x_td[token], up, down, group_sizes, relu2, kernels=kernels)
    y = y.astype(jnp.float32) * weights_tk.reshape(-1)[order][:, None]
    return jnp.zeros((t, y.shape[-1]), jnp.float32).at[token].add(y)


def sequence_aux_loss(scores_bte: jax.Array, ids_btk: jax.Array, num_experts: int) -> jax.Array:
    """Sequence-level balance loss: mean over sequences of E/(k t) * sum_e count_e * mean_t p_e."""
    b, t, k = ids_btk.shape
    probs = scores_bte / (jnp.sum(scores_bte, axis=-1, keepdims=True) + 1e-20)
    counts = jnp.sum(jax.nn.one_hot(ids_btk, num_experts, dtype=jnp.float32), axis=(1, 2))
    load = counts * num_experts / (k * t)
    return jnp.mean(jnp.sum(load * jnp.mean(probs, axis=1), axis=-1))


class Router(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_td: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        c = self.config
        kernel = self.param("kernel", nn.with_logical_partitioning(default_init(), ("embed", "router_experts")),
                            (c.hidden_size, c.n_routed_experts), jnp.float32)
        bias = self.variable("buffers", "e_score_correction_bias",
                             lambda: jnp.zeros((c.n_routed_experts,), jnp.float32)).value
        scores = jax.nn.sigmoid(jnp.dot(x_td.astype(jnp.float32), kernel.astype(jnp.float32)))
        ids, weights = route(scores, bias, c)
        return ids, weights, scores


class Experts(nn.Module):
    """The routed experts' stacked weights: up [E, width, f], down [E, f, width] in the parameter dtype,
    or, for a projection the config lists in `weight_formats`, the ModelOpt tensors stacked per expert
    (FP8: `<proj>` float8_e4m3fn in the same layout plus `<proj>_weight_scale` [E]; NVFP4:
    `<proj>_weight` uint8 [E, out, in/2], `<proj>_weight_scale` [E, out, in/16], `<proj>_weight_scale_2`
    [E]; both with `<proj>_input_scale` [E]). Every format runs through one grouped matmul per projection;
    float experts train with the NVFP4 recipe when the config says so.

    With an expert axis > 1 on the context mesh the experts run expert-parallel (`nemojax.ops.expert_parallel`).
    """

    config: ModelConfig

    def _bank(self, proj: str, k: int, n: int, axes: tuple[str, str], init) -> Bank:
        """The expert bank of projection `proj` (in width k, out width n) in its configured format."""
        c = self.config
        e, fmt = c.n_routed_experts, weight_format(c, self, proj)
        zeros = nn.initializers.zeros
        if fmt is None:
            kernel = self.param(proj, nn.with_logical_partitioning(init, ("experts",) + axes), (e, k, n),
                                dtype_of(c.param_dtype))
            if trains_quantized(c, self, proj):
                return {"kernel": kernel, "train_rng": quant_rng(self)}
            return {"kernel": kernel}
        scale_param(self, f"{proj}_input_scale", (e,), ("experts",))
        if fmt == "fp8":
            kernel = self.param(proj, nn.with_logical_partitioning(zeros, ("experts",) + axes), (e, k, n),
                                jnp.float8_e4m3fn)
            return {"kernel": kernel, "weight_scale": scale_param(self, f"{proj}_weight_scale", (e,), ("experts",))}
        out_in = ("experts",) + axes[::-1]
        ones = nn.initializers.ones
        return {
            "weight": self.param(f"{proj}_weight", nn.with_logical_partitioning(zeros, out_in), (e, n, k // 2),
                                 jnp.uint8),
            "weight_scale": self.param(f"{proj}_weight_scale", nn.with_logical_partitioning(ones, out_in),
                                       (e, n, k // BLOCK), jnp.float8_e4m3fn),
            "weight_scale_2": scale_param(self, f"{proj}_weight_scale_2", (e,), ("experts",)),
        }

    @nn.compact
    def __call__(self, x_td: jax.Array, ids_tk: jax.Array, weights_tk: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(routed output [t, width] float32, token copies dropped for capacity)."""
        c = self.config
        e, w, f = c.n_routed_experts, c.moe_expert_width, c.moe_intermediate_size
        down_init = default_init(0.02 / math.sqrt(2 * c.num_layers))
        up = self._bank("up_proj", w, f, ("expert_embed", "expert_mlp"), default_init())
        down = self._bank("down_proj", f, w, ("expert_mlp", "expert_embed"), down_init)
        if uses_expert_parallelism(jax.sharding.get_abstract_mesh(), e):
            y, stats = expert_parallel_moe(x_td, ids_tk, weights_tk, up, down, relu2,
                                           capacity_factor=c.moe_capacity_factor, kernels=c.kernels)
            return y, stats.dropped_rows
        return dropless_experts(x_td, ids_tk, weights_tk, up, down, c.kernels), jnp.zeros((), jnp.int32)


class MoE(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_btd: jax.Array) -> jax.Array:
        c = self.config
        dtype, pdtype = dtype_of(c.compute_dtype), dtype_of(c.param_dtype)
        b, t, d = x_btd.shape
        x_td = x_btd.reshape(b * t, d)
        ids, weights, scores = Router(c, name="gate")(x_td)
        routed_in = x_td
        if c.moe_latent_size is not None:
            routed_in = Linear(c.moe_latent_size, ("embed", "latent"), dtype, pdtype, config=c,
                               name="fc1_latent_proj")(x_td)
        routed, dropped = Experts(c, name="experts")(routed_in.astype(dtype), ids, weights)
        routed = routed.astype(dtype)
        self.record({"expert_load": jnp.bincount(ids.reshape(-1), length=c.n_routed_experts),
                     "aux_loss": sequence_aux_loss(scores.reshape(b, t, -1), ids.reshape(b, t, -1),
                                                   c.n_routed_experts),
                     "dropped_rows": dropped})
        if c.moe_latent_size is not None:
            routed = Linear(d, ("latent", "embed"), dtype, pdtype, config=c, name="fc2_latent_proj")(routed)
        shared = MLP(c, c.moe_shared_expert_intermediate_size, name="shared_experts")(x_td)
        return (routed + shared).reshape(b, t, d)

    def record(self, stats: dict[str, jax.Array]) -> None:
        """Sow the routing statistics (`moe_stat_shapes`; training reads them). Scanned layers call it
        once after the scan, with every MoE layer's values stacked (`nemojax.model.scanned`)."""
        for name, value in stats.items():
            self.sow("intermediates", name, value)


def moe_stat_shapes(config: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """What one MoE layer sows: expert loads (copies per expert), the sequence aux loss, and token
    copies dropped for capacity (0 when dropless)."""
    return {"expert_load": jax.ShapeDtypeStruct((config.n_routed_experts,), jnp.int32),
            "aux_loss": jax.ShapeDtypeStruct((), jnp.float32),
            "dropped_rows": jax.ShapeDtypeStruct((), jnp.int32)}
