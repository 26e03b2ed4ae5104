"""Model pieces against direct implementations: dropless MoE vs a per-token expert loop, and the MTP
block vs the FACTS.md formula."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import causal_gqa, latent_moe, rmsnorm

from nemojax.config import from_hf_config, resolve_model_config
from nemojax.model import NemotronH, init_variables
from nemojax.model.moe import MoE

SMALL = dict(vocab_size=50, hidden_size=32, hybrid_override_pattern="M*E", num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
             n_groups=2, chunk_size=4, intermediate_size=48, n_routed_experts=8, num_experts_per_tok=3,
             moe_intermediate_size=16, moe_shared_expert_intermediate_size=24, moe_latent_size=12, n_group=2,
             topk_group=1, routed_scaling_factor=2.5, mtp_hybrid_override_pattern="*E",
             num_nextn_predict_layers=1, compute_dtype="float32", param_dtype="float32")


def _np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("latent,n_group,topk_group", [(12, 2, 1), (None, 1, 1), (12, 4, 2)])
def test_dropless_moe_equals_per_token_loop(latent, n_group, topk_group):
    cfg = from_hf_config(dict(SMALL, moe_latent_size=latent, n_group=n_group, topk_group=topk_group))
    moe = MoE(cfg)
    x = jax.random.normal(jax.random.key(0), (3, 7, cfg.hidden_size))
    variables = nn.meta.unbox(moe.init(jax.random.key(1), x))
    bias = 0.3 * jax.random.normal(jax.random.key(2), (cfg.n_routed_experts,))
    variables = {"params": variables["params"], "buffers": {"gate": {"e_score_correction_bias": bias}}}
    ours = moe.apply(variables, x)
    ref = latent_moe(np.asarray(x, np.float64).reshape(-1, cfg.hidden_size), _np(variables["params"]),
                     np.asarray(bias, np.float64), cfg)
    np.testing.assert_allclose(np.asarray(ours).reshape(-1, cfg.hidden_size), ref, rtol=1e-4, atol=1e-5)


def test_moe_gradients_are_finite_and_reach_every_used_expert():
    cfg = from_hf_config(SMALL)
    moe = MoE(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 9, cfg.hidden_size))
    variables = nn.meta.unbox(moe.init(jax.random.key(1), x))
    grads = jax.grad(lambda p: jnp.sum(moe.apply({**variables, "params": p}, x) ** 2))(variables["params"])
    up = np.asarray(grads["experts"]["up_proj"])
    _, state = moe.apply(variables, x, mutable=["intermediates"])
    load = np.asarray(state["intermediates"]["expert_load"][0])
    assert load.sum() == 2 * 9 * cfg.num_experts_per_tok
    assert np.all((np.abs(up).sum(axis=(1, 2)) > 0) == (load > 0))


def test_mtp_block_matches_facts_formula():
    """h_t after norm_f, e = embed(token t+1), x = eh_proj([enorm(e), hnorm(h)]), attention and MoE
    sublayers (pre-norm, residual), final_layernorm, shared lm_head."""
    cfg = from_hf_config(SMALL)
    model = NemotronH(cfg)
    variables = init_variables(cfg, jax.random.key(0))
    bias = 0.2 * jax.random.normal(jax.random.key(3), (cfg.n_routed_experts,))
    variables["buffers"]["mtp"]["layers_1"]["block"]["mixer"]["gate"]["e_score_correction_bias"] = bias
    ids = jax.random.randint(jax.random.key(1), (1, 9), 0, cfg.vocab_size)
    _, hidden, _ = model.apply(variables, ids, method="forward")
    logits, _, _ = model.apply(variables, hidden[:, :-1], ids[:, 1:], method="mtp_forward")

    p = _np(variables["params"])
    m0, m1 = p["mtp"]["layers_0"], p["mtp"]["layers_1"]
    h = np.asarray(hidden[0, :-1], np.float64)
    e = p["backbone"]["embeddings"]["weight"][np.asarray(ids[0, 1:])]
    x = np.concatenate([rmsnorm(e, m0["enorm"]["weight"]), rmsnorm(h, m0["hnorm"]["weight"])], -1)
    x = x @ m0["eh_proj"]["kernel"]
    x = x + causal_gqa(rmsnorm(x, m0["block"]["norm"]["weight"]), m0["block"]["mixer"], cfg)
    x = x + latent_moe(rmsnorm(x, m1["block"]["norm"]["weight"]), m1["block"]["mixer"], np.asarray(bias), cfg)
    x = rmsnorm(x, m1["final_layernorm"]["weight"])
    expected = x @ p["lm_head"]["kernel"]
    np.testing.assert_allclose(np.asarray(logits[0]), expected, rtol=1e-4, atol=1e-4)


def test_tiny_config_has_every_layer_kind_and_mtp():
    cfg = resolve_model_config("tiny")
    assert set(cfg.layer_types) == {"mamba", "attention", "moe", "mlp"}
    assert cfg.moe_latent_size is not None and cfg.has_mtp
    variables = init_variables(cfg, jax.random.key(0))
    logits = NemotronH(cfg).apply(variables, jnp.zeros((1, 5), jnp.int32))
    assert logits.shape == (1, 5, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))
