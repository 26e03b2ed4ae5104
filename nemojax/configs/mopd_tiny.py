"""MOPD on a small model: the student samples continuations of prompts from two domains (code, prose)
and each domain's teacher scores every sampled token; loss = reverse KL(student || teacher).

The teachers are checkpoints sharing the student's tokenizer (they may be of another size);
`python bench/mopd_demo.py` trains two of them on the standard-library corpus split into code and
docstrings/comments and writes the domain files below. Override paths with
--config.posttrain.domains.code.teacher=DIR etc.
"""

import ml_collections

from nemojax.configs.tiny import get_model_config as tiny_model_config


def get_model_config() -> ml_collections.ConfigDict:
    """The tiny config's layer pattern (every layer kind and the MTP block) at small widths."""
    model = tiny_model_config()
    model.update(vocab_size=512, hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                 mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, chunk_size=32, intermediate_size=128,
                 n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                 moe_shared_expert_intermediate_size=64, moe_latent_size=32)
    return model


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        model=get_model_config(),
        num_steps=60,
        log_every=1,
        checkpoint_every=20,
        keep_checkpoints=2,
        mesh=dict(data=1, fsdp=1, tensor=1, expert=1),
        optimizer=dict(learning_rate=1e-3, schedule="constant", warmup_steps=5, weight_decay=0.0),
        posttrain=dict(
            method="mopd",
            prompts_per_source=4,
            group_size=1,
            prompt_tokens=24,
            max_new_tokens=24,
            temperature=1.0,
            domains=dict(
                code=dict(teacher="runs/mopd_demo/teacher_code", paths=("runs/mopd_demo/data/code.jsonl",)),
                prose=dict(teacher="runs/mopd_demo/teacher_prose", paths=("runs/mopd_demo/data/prose.jsonl",)),
            ),
        ),
    ))
