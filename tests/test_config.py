"""Config parsing: every published naming, the three published configs, and errors that name the field."""

import json
import math

import pytest

from nemojax.config import ModelConfig, from_hf_config, resolve_model_config, to_hf_dict
from nemojax.errors import ConfigError

PUBLISHED = {
    # name: (file, layers, mamba, moe, attention, mtp kinds)
    "nano": ("tests/data/nano-30b-a3b.config.json", 52, 23, 23, 6, ()),
    "super": ("tests/data/super-120b-a12b.config.json", 88, 40, 40, 8, ("attention", "moe")),
    "ultra": ("tests/data/ultra-550b-a55b.config.json", 108, 48, 48, 12, ("attention", "moe")),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_parse_to_published_layer_counts(name):
    path, layers, mamba, moe, attention, mtp = PUBLISHED[name]
    cfg = from_hf_config(path)
    assert cfg.num_layers == layers
    assert (cfg.layer_types.count("mamba"), cfg.layer_types.count("moe"), cfg.layer_types.count("attention")) == (
        mamba, moe, attention)
    assert cfg.mtp_layer_types == mtp


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_configs_package_equals_published(name):
    path = PUBLISHED[name][0]
    depths = 2 if name in ("super", "ultra") else 1  # trained with the MTP block chained twice (FACTS.md)
    assert resolve_model_config(name) == from_hf_config(path, compute_dtype="bfloat16", param_dtype="bfloat16",
                                                        mtp_num_depths=depths)


def test_published_sizes():
    nano, sup, ultra = (from_hf_config(PUBLISHED[n][0]) for n in ("nano", "super", "ultra"))
    assert (nano.hidden_size, sup.hidden_size, ultra.hidden_size) == (2688, 4096, 8192)
    assert nano.moe_latent_size is None and (sup.moe_latent_size, ultra.moe_latent_size) == (1024, 2048)
    assert (sup.n_routed_experts, sup.num_experts_per_tok, sup.routed_scaling_factor) == (512, 22, 5.0)
    assert nano.mamba_inner == 64 * 64 and ultra.mamba_inner == 256 * 64
    assert nano.time_step_limit == (0.0, math.inf)


def _base(**changes):
    d = json.load(open("tests/data/nano-30b-a3b.config.json"))
    d.update(changes)
    return d


def test_every_layer_naming_gives_the_same_layers():
    pattern = "ME*-M"
    names_old = ["mamba", "moe", "attention", "mlp", "mamba"]
    names_new = ["linear_attention", "moe", "full_attention", "mlp", "linear_attention"]
    a = from_hf_config(_base(hybrid_override_pattern=pattern, num_hidden_layers=5))
    b = from_hf_config({k: v for k, v in _base(layers_block_type=names_old, num_hidden_layers=None).items()
                        if k != "hybrid_override_pattern"})
    c = from_hf_config({k: v for k, v in _base(layers_block_type=names_new).items()
                        if k not in ("hybrid_override_pattern", "num_hidden_layers")})
    assert a.layer_types == b.layer_types == c.layer_types == ("mamba", "moe", "attention", "mlp", "mamba")


def test_mtp_namings():
    a = from_hf_config(_base(mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1))
    b = from_hf_config(_base(mtp_layers_block_type=["full_attention", "moe"], num_nextn_predict_layers=1))
    assert a.mtp_layer_types == b.mtp_layer_types == ("attention", "moe") and a.has_mtp


def test_time_step_limit_namings():
    assert from_hf_config(_base(time_step_limit=[0.01, 0.5])).time_step_limit == (0.01, 0.5)
    assert from_hf_config(_base(mamba_dt_limit=[0.02, 1.0])).time_step_limit == (0.02, 1.0)
    written = [0.05, {"__float__": "Infinity"}]  # how transformers writes infinity
    assert from_hf_config(_base(time_step_limit=written)).time_step_limit == (0.05, math.inf)


@pytest.mark.parametrize("changes,field", [
    (dict(hybrid_override_pattern="MEX*"), "hybrid_override_pattern"),
    (dict(num_attention_heads=32, num_key_value_heads=5), "num_key_value_heads"),
    (dict(n_group=3), "n_group"),
    (dict(n_groups=7), "n_groups"),
    (dict(num_hidden_layers=3), "num_hidden_layers"),
    (dict(topk_group=4, n_group=2), "topk_group"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(mlp_hidden_act="gelu"), "mlp_hidden_act"),
    (dict(mtp_layers_block_type=["attention", "conv"], num_nextn_predict_layers=1), "mtp_layers_block_type"),
    (dict(mtp_num_depths=0), "mtp_num_depths"),
])
def test_validation_names_the_bad_field(changes, field):
    with pytest.raises(ConfigError, match=f"`{field}`"):
        from_hf_config(_base(**changes))


def test_round_trip_through_dicts():
    cfg = resolve_model_config("tiny")
    assert from_hf_config(to_hf_dict(cfg), compute_dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype) == cfg
    from nemojax.config import from_dict
    assert from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg, ModelConfig)


def test_unknown_config_name():
    with pytest.raises(ConfigError, match="tiny"):
        resolve_model_config("bogus")


def test_missing_fields_take_the_transformers_defaults():
    """One set of defaults: a config.json that leaves fields out means what transformers reads from it."""
    from transformers import NemotronHConfig

    minimal = {"vocab_size": 1000, "hidden_size": 64, "hybrid_override_pattern": "ME*-"}
    ours, theirs = from_hf_config(minimal), NemotronHConfig(**minimal)
    for name in ("num_attention_heads", "num_key_value_heads", "head_dim", "mamba_num_heads", "mamba_head_dim",
                 "ssm_state_size", "n_groups", "conv_kernel", "chunk_size", "intermediate_size", "n_routed_experts",
                 "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size",
                 "moe_latent_size", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor",
                 "layer_norm_epsilon", "max_position_embeddings", "bos_token_id", "pad_token_id", "use_conv_bias"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.eos_token_id == (theirs.eos_token_id,)
    assert ours.time_step_limit == tuple(theirs.time_step_limit)


def test_storage_dtype_key_does_not_set_the_compute_dtype():
    stored_bf16 = _base(dtype="bfloat16", torch_dtype="bfloat16")
    assert from_hf_config(stored_bf16).compute_dtype == ModelConfig.compute_dtype  # the dataclass default
    assert from_hf_config(stored_bf16, compute_dtype="float32").compute_dtype == "float32"


def test_dtype_fields_accept_numpy_and_jax_dtypes():
    import jax.numpy as jnp
    import numpy as np

    cfg = from_hf_config(_base(), compute_dtype=jnp.float32, param_dtype=np.dtype("bfloat16"))
    assert (cfg.compute_dtype, cfg.param_dtype) == ("float32", "bfloat16")
    with pytest.raises(ConfigError, match="compute_dtype"):
        from_hf_config(_base(), compute_dtype="int8")


def test_packaged_configs_resolve_by_name_and_by_thin_file():
    from nemojax.config import packaged_config_names

    assert {"tiny", "nano", "super", "ultra"} <= set(packaged_config_names())
    assert resolve_model_config("tiny") == resolve_model_config("configs/tiny.py")
