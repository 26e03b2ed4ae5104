"""The embedded default: a small Nemotron-H with every layer kind (M, E with a latent, *, -) and one
MTP block, small enough to train on 2 CPU cores in minutes."""

import ml_collections


def get_model_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        vocab_size=4096,
        hidden_size=256,
        hybrid_override_pattern="ME*M-E",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        mamba_num_heads=8,
        mamba_head_dim=32,
        ssm_state_size=32,
        n_groups=2,
        conv_kernel=4,
        chunk_size=64,
        intermediate_size=512,
        n_routed_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=128,
        moe_shared_expert_intermediate_size=256,
        moe_latent_size=128,
        n_group=2,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        mtp_hybrid_override_pattern="*E",
        num_nextn_predict_layers=1,
        layer_norm_epsilon=1e-5,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        param_dtype="float32",
        compute_dtype="float32",
    ))


def get_config() -> ml_collections.ConfigDict:
    """The model plus the training fields chosen for it (every other field keeps its default in
    nemojax/train/run_config.py). fp32 compute: on CPU bf16 is no faster for this model."""
    return ml_collections.ConfigDict(dict(
        model=get_model_config(),
        num_steps=400,
        batch_size=8,
        seq_len=128,
        log_every=10,
        eval_every=100,
        eval_batches=8,
        checkpoint_every=100,
        keep_checkpoints=2,
        bias_update_rate=1e-2,
        optimizer=dict(learning_rate=1e-3, schedule="wsd", warmup_steps=30, decay_fraction=0.2, min_lr_ratio=0.1),
    ))
