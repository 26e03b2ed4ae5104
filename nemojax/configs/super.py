"""Nemotron 3 Super 120B-A12B: the published config.json fields (model architecture only).

Layer lists are written as `hybrid_override_pattern` strings; `tests/test_config.py` checks that this
parses to exactly the published config (kept verbatim under tests/data/).
"""

import ml_collections

PUBLISHED = {
    'attention_bias': False,
    'attention_dropout': 0.0,
    'bos_token_id': 1,
    'chunk_size': 128,
    'conv_kernel': 4,
    'eos_token_id': 2,
    'expand': 2,
    'head_dim': 128,
    'hidden_dropout': 0.0,
    'hidden_size': 4096,
    'hybrid_override_pattern': 'MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME',
    'initializer_range': 0.02,
    'intermediate_size': 2688,
    'layer_norm_epsilon': 1e-05,
    'mamba_head_dim': 64,
    'mamba_hidden_act': 'silu',
    'mamba_num_heads': 128,
    'mamba_proj_bias': False,
    'mamba_ssm_cache_dtype': 'float32',
    'max_position_embeddings': 262144,
    'mlp_bias': False,
    'mlp_hidden_act': 'relu2',
    'model_type': 'nemotron_h',
    'moe_intermediate_size': 2688,
    'moe_latent_size': 1024,
    'moe_shared_expert_intermediate_size': 5376,
    'moe_shared_expert_overlap': False,
    'mtp_hybrid_override_pattern': '*E',
    'n_group': 1,
    'n_groups': 8,
    'n_routed_experts': 512,
    'n_shared_experts': 1,
    'norm_eps': 1e-05,
    'norm_topk_prob': True,
    'num_attention_heads': 32,
    'num_experts_per_tok': 22,
    'num_hidden_layers': 88,
    'num_key_value_heads': 2,
    'num_logits_to_keep': 1,
    'num_nextn_predict_layers': 1,
    'pad_token_id': 0,
    'partial_rotary_factor': 1.0,
    'rescale_prenorm_residual': True,
    'residual_in_fp32': False,
    'rope_theta': 10000,
    'routed_scaling_factor': 5.0,
    'sliding_window': None,
    'ssm_state_size': 128,
    'tie_word_embeddings': False,
    'time_step_floor': 0.0001,
    'time_step_max': 0.1,
    'time_step_min': 0.001,
    'topk_group': 1,
    'use_bias': False,
    'use_conv_bias': True,
    'vocab_size': 131072,
}


def get_model_config() -> ml_collections.ConfigDict:
    # mtp_num_depths=2: the one MTP block chained twice in training, as released.
    return ml_collections.ConfigDict(dict(PUBLISHED, param_dtype="bfloat16", compute_dtype="bfloat16", scan_layers=True,
                                          mtp_num_depths=2))


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(model=get_model_config()))
