"""GRPO with verifiable rewards on a small model: two environments mixed in every step (sums of
one-digit numbers scored by exact match, and bracket prefixes to close), groups of 8 rollouts per
prompt, group-relative advantages after per-environment normalisation, KL penalty to the starting
model. Start from a checkpoint that knows the task format (`python bench/rlvr_demo.py` trains one):
--init-from DIR; without it the student is a random model (and its tokenizer is trained on samples
of the environments' prompts).
"""

import ml_collections

from nemojax.configs.mopd_tiny import get_model_config as small_model_config


def get_model_config() -> ml_collections.ConfigDict:
    model = small_model_config()
    model.update(vocab_size=320)
    return model


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        model=get_model_config(),
        num_steps=60,
        log_every=1,
        checkpoint_every=20,
        keep_checkpoints=2,
        mesh=dict(data=1, fsdp=1, tensor=1, expert=1),
        data=dict(vocab_size=320),
        optimizer=dict(learning_rate=1e-3, schedule="constant", warmup_steps=5, weight_decay=0.0),
        posttrain=dict(
            method="grpo",
            prompts_per_source=32,  # fewer gives a gradient too noisy for Adam here (docs/post-training.md)
            group_size=8,
            max_new_tokens=4,
            temperature=1.0,
            clip_eps=0.2,
            kl_coef=0.02,
            environments=dict(
                arithmetic=dict(task="arithmetic", reward="exact_match", max_operand=4),
                brackets=dict(task="brackets", reward="balanced_brackets", length=3),
            ),
        ),
    ))
