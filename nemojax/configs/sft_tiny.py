"""Supervised fine-tuning of the tiny model on chats: packed with document masking (attention and Mamba
states never cross a chat, no target crosses one), loss on assistant tokens only.

Give the data and the model to start from:
    nemojax-train --config sft_tiny --workdir runs/sft --init-from runs/tiny \
        --config.data.paths=chats.jsonl
Chats are jsonl records with a `messages` list (and optional `reasoning`: on | off | medium | low);
the same config shape fine-tunes the published models with their config and `--init-from`.
"""

import ml_collections

from nemojax.configs import tiny


def get_model_config() -> ml_collections.ConfigDict:
    return tiny.get_model_config()


def get_config() -> ml_collections.ConfigDict:
    cfg = tiny.get_config()
    cfg.num_steps = 200
    cfg.eval_every = 50
    cfg.checkpoint_every = 50
    cfg.data = ml_collections.ConfigDict(dict(source="files", format="chat", document_masking=True,
                                              heldout_fraction=0.05))
    cfg.optimizer = dict(learning_rate=1e-4, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    return cfg
