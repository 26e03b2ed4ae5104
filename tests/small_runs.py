"""Command-line overrides shared by the training tests (test-only helper)."""

# The tiny config's model at small widths, a 512-token vocabulary and a 200 kB corpus: a few seconds a step.
SMALL_MODEL_ARGS = [
    "--config.model.vocab_size=512", "--config.model.hidden_size=64", "--config.model.num_attention_heads=2",
    "--config.model.num_key_value_heads=1", "--config.model.head_dim=32", "--config.model.mamba_num_heads=4",
    "--config.model.mamba_head_dim=16", "--config.model.ssm_state_size=16", "--config.model.chunk_size=32",
    "--config.model.intermediate_size=128", "--config.model.n_routed_experts=8",
    "--config.model.num_experts_per_tok=2", "--config.model.moe_intermediate_size=32",
    "--config.model.moe_shared_expert_intermediate_size=64", "--config.model.moe_latent_size=32",
    "--config.data.vocab_size=512", "--config.data.max_corpus_bytes=200000",
]
